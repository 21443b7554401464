"""The cloud sources as they run for real: inside `spop serve` with a journal (answered only after
the commit, so a SIGKILL right after the answer loses nothing, and a callback retried after the
restart pops nobody twice), and standalone with `spop source NAME` sending to a hub process."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from hubproc import HubProcess

DATA = Path(__file__).parent / "data"
TWILIO = json.loads((DATA / "twilio_taskrouter.json").read_text())["events"]
CONNECT = json.loads((DATA / "amazon_connect_events.json").read_text())["call"]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "amazon-connect.toml"
TOKEN = "f3e1c0ffee0123456789abcdef012345"
SECRET = "eventbridge-api-key-0123456789"


def post(url: str, data: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def twilio_post(url: str, params: dict[str, str]) -> int:
    text = url + "".join(f"{key}{params[key]}" for key in sorted(params))
    signature = base64.b64encode(
        hmac.new(TOKEN.encode(), text.encode(), hashlib.sha1).digest()
    ).decode()
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
    return post(url, urlencode(params).encode(), headers)[0]


def listen(address: str, resource: str, count: int, tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag-listen")}
    cmd = [sys.executable, "-m", "spop_cli", "listen", "telephone", resource, "--server", address]
    cmd += ["--json", "--count", str(count), "--timeout", "30"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def pops_of(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    return [line for line in lines if "type" not in line]  # a contact change's line has a type


def status(hub: HubProcess) -> dict[str, Any]:
    with urllib.request.urlopen(hub.http + "/v1/status", timeout=10) as response:
        return json.loads(response.read())


def test_twilio_inside_serve_answers_after_the_commit_and_a_retry_after_a_restart_pops_once(
    tmp_path: Path,
) -> None:
    config = tmp_path / "spop.toml"
    config.write_text(f'[sources.tw]\ntype = "twilio"\nauth_token = "{TOKEN}"\n', encoding="utf-8")
    with HubProcess(tmp_path / "hub", "--config", str(config)) as hub:
        url = hub.http + "/v1/sources/tw/events"
        assert twilio_post(url, TWILIO["task.created"]) == 204
        assert twilio_post(url, TWILIO["reservation.created"]) == 204
        hub.kill()  # right after the answer: the pop must be in the journal
        hub.start()
        url = hub.http + "/v1/sources/tw/events"
        assert twilio_post(url, TWILIO["reservation.created"]) == 204  # TaskRouter retries

        [pop] = pops_of(listen(hub.address, "13579", 1, tmp_path))
        after = status(hub)

    assert (pop["id"], pop["wait_time"], pop["queue_name"]) == (
        TWILIO["reservation.created"]["Sid"],
        10,
        "Ventes",
    )
    # the retried event is known after the restart (its id is journalled with the contact):
    # answered as a duplicate event, no second pop made
    assert after["counters"]["duplicate_events"] == 1 and after["pending"] == 0
    assert after["counters"].get("duplicates", 0) == 0


def test_webhook_standalone_sends_to_the_hub_and_relays_its_refusals(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    with HubProcess(tmp_path / "hub") as hub:
        config = tmp_path / "spop.toml"
        config.write_text(
            f'[server]\naddress = "{hub.address}"\n\n'
            + text.replace('path = "events"', 'path = "events"\nlisten = "127.0.0.1:0"'),
            encoding="utf-8",
        )
        env = {
            **os.environ,
            "SPOP_DIAG_DIR": str(tmp_path / "diag-source"),
            "SPOP_CONNECT_SECRET": SECRET,
        }
        source = subprocess.Popen(
            [sys.executable, "-m", "spop_cli", "source", "connect", "--config", str(config)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        listener = listen(hub.address, "13579", 1, tmp_path)
        try:
            assert source.stderr is not None
            line = source.stderr.readline()
            while line and not line.startswith("spop source connect:"):
                line = source.stderr.readline()
            port = int(line.rsplit(" ", 1)[1])
            url = f"http://127.0.0.1:{port}/v1/sources/connect/events"
            headers = {"Content-Type": "application/json", "X-Spop-Secret": SECRET}
            answers = [
                post(url, json.dumps(CONNECT[k]).encode(), headers) for k in ("INITIATED", "QUEUED")
            ]
            stranger = json.loads(json.dumps(CONNECT["CONNECTED_TO_AGENT"]))
            stranger["detail"]["agentInfo"]["agentArn"] += "-unknown"
            refused = post(url, json.dumps(stranger).encode(), headers)
            answers.append(post(url, json.dumps(CONNECT["CONNECTED_TO_AGENT"]).encode(), headers))
            [pop] = pops_of(listener)
            ended = [
                post(url, json.dumps(CONNECT["DISCONNECTED"]).encode(), headers) for _ in range(2)
            ]
        finally:
            source.terminate()
            source.wait(10)
            listener.kill()

    assert [a[0] for a in answers] == [200, 200, 200]
    assert (pop["resource"], pop["wait_time"], pop["queue_name"]) == ("13579", 12, "Ventes")
    assert refused[0] == 422
    assert (refused[1]["error"], refused[1]["field"], refused[1]["rule"]) == (
        "missing_field",
        "resource",
        "connected",
    )
    assert [e[0] for e in ended] == [200, 200]
    assert ended[1][1]["applied"] == 1  # the retried delivery: applied once, nothing changed
