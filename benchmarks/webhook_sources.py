"""How long a cloud platform waits for the hub's answer to one webhook.

Starts `spop serve` with a SQLite journal and two sources (`twilio`, and the Amazon Connect mapping
of examples/amazon-connect.toml), then posts contacts one request at a time over one keep-alive
connection, as a platform does: for Twilio a signed `task.created` then `reservation.created` (a
pop), for Connect `INITIATED`, `QUEUED`, `CONNECTED_TO_AGENT` (a pop). Each answer comes only after
the journal commit. Prints the latency of the answers (p50, p99, max) and the requests per second.

    python benchmarks/webhook_sources.py [--contacts 500]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
TWILIO = json.loads((ROOT / "tests/data/twilio_taskrouter.json").read_text())["events"]
CONNECT = json.loads((ROOT / "tests/data/amazon_connect_events.json").read_text())["call"]
TOKEN = "bench-auth-token"
SECRET = "bench-secret"


def signed(url: str, params: dict[str, str]) -> dict[str, str]:
    text = url + "".join(f"{key}{params[key]}" for key in sorted(params))
    digest = hmac.new(TOKEN.encode(), text.encode(), hashlib.sha1).digest()
    return {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": base64.b64encode(digest).decode(),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(http: str, contacts: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"twilio": [], "connect": []}
    async with aiohttp.ClientSession() as session:

        async def timed(kind: str, url: str, data: bytes, headers: dict[str, str]) -> None:
            start = time.perf_counter()
            async with session.post(url, data=data, headers=headers) as response:
                await response.read()
                assert response.status in (200, 204), (response.status, await response.text())
            times[kind].append(time.perf_counter() - start)

        url = f"{http}/v1/sources/tw/events"
        for n in range(contacts):
            task = f"WT{n:032x}"
            for name in ("task.created", "reservation.created"):
                params = {**TWILIO[name], "TaskSid": task, "Sid": f"EV{n:030x}{len(name):02x}"}
                await timed("twilio", url, urlencode(params).encode(), signed(url, params))
        url = f"{http}/v1/sources/connect/events"
        headers = {"Content-Type": "application/json", "X-Spop-Secret": SECRET}
        for n in range(contacts):
            for name in ("INITIATED", "QUEUED", "CONNECTED_TO_AGENT"):
                event = copy.deepcopy(CONNECT[name])
                event["id"] = f"{n}-{name}"
                event["detail"]["contactId"] = f"contact-{n}"
                await timed("connect", url, json.dumps(event).encode(), headers)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contacts", type=int, default=500, help="contacts per source")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "spop.toml"
        example = (ROOT / "examples/amazon-connect.toml").read_text()
        example = example.replace('secret_env = "SPOP_CONNECT_SECRET"', f'secret = "{SECRET}"')
        config.write_text(f'[sources.tw]\ntype = "twilio"\nauth_token = "{TOKEN}"\n\n{example}')
        ready = Path(tmp) / "ready.json"
        cmd = [sys.executable, "-m", "spop_cli", "serve", "--port", "0", "--http-port", "0"]
        cmd += ["--config", str(config), "--journal", str(Path(tmp) / "journal.sqlite3")]
        cmd += ["--ready-file", str(ready)]
        env = {**os.environ, "SPOP_DIAG_DIR": str(Path(tmp) / "diag")}
        hub = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not ready.exists():
                if hub.poll() is not None:
                    raise SystemExit(f"spop serve exited {hub.returncode}")
                time.sleep(0.05)
            http = f"http://127.0.0.1:{json.loads(ready.read_text())['http_port']}"
            started = time.perf_counter()
            times = asyncio.run(run(http, args.contacts))
            elapsed = time.perf_counter() - started
        finally:
            hub.send_signal(signal.SIGTERM)
            hub.wait(10)
    print(f"{'source':<8} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for kind, values in times.items():
        p50, p99 = percentile(values, 0.5) * 1e3, percentile(values, 0.99) * 1e3
        print(f"{kind:<8} {len(values):>8} {p50:>8.2f} {p99:>8.2f} {max(values) * 1e3:>8.2f}")
    total = sum(len(v) for v in times.values())
    print(f"{total} requests in {elapsed:.1f} s: {total / elapsed:.0f} requests/s, one at a time")


if __name__ == "__main__":
    main()
