"""The example plugins in plugins/, loaded from their folder as a user would, run for real."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from guide_pops import guide_pop
from spop_cli.actions import ActionConfigError, ActionError, ActionSkipped, configure_action
from spop_cli.dispatch import ActionDispatcher
from spop_cli.plugins import action_types, build_plugin_manager

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


@pytest.fixture(scope="module")
def types() -> dict:
    return action_types(build_plugin_manager([PLUGINS], entry_points=False))


def test_both_come_from_their_files(types: dict) -> None:
    assert types["webhook"].origin == str(PLUGINS / "webhook.py")
    assert types["notify"].origin == str(PLUGINS / "notify.py")


# -- webhook: a real HTTP server on a free loopback port ------------------------------------------
class Endpoint:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status = 200
        self.delay = 0.0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                endpoint.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
                )
                if endpoint.delay:
                    threading.Event().wait(endpoint.delay)
                try:
                    self.send_response(endpoint.status)
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:  # the client gave up (the timeout test)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # shutdown() waits for the serve loop's next poll: 0.5 s by default, per test
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    running = Endpoint()
    yield running
    running.server.shutdown()
    running.server.server_close()


def test_webhook_posts_the_pop_as_json(types: dict, endpoint: Endpoint) -> None:
    action = types["webhook"].factory(
        {
            "url": endpoint.url + "/hooks/pop?agent={resource}&q={queue_name}",
            "headers": {"X-Crm": "prod"},
        }
    )
    pop = guide_pop()
    action.run(pop)
    (request,) = endpoint.requests
    assert request["path"] == "/hooks/pop?agent=13579&q=File%20d%27attente%20des%20ventes"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["X-Crm"] == "prod"
    body = request["body"]
    assert {k: v for k, v in body.items() if k != "received_at"} == pop.to_dict()
    assert body["contact_data"] == {"code1": "chaîne1"}


def test_webhook_error_status_is_a_failure(types: dict, endpoint: Endpoint) -> None:
    endpoint.status = 503
    action = types["webhook"].factory({"url": endpoint.url + "/down"})
    with pytest.raises(ActionError, match=r"answered HTTP 503"):
        action.run(guide_pop())


def test_webhook_times_out(types: dict, endpoint: Endpoint) -> None:
    endpoint.delay = 3
    action = types["webhook"].factory({"url": endpoint.url + "/slow", "timeout": 0.3})
    with pytest.raises(ActionError, match="cannot POST"):
        action.run(guide_pop())


def test_webhook_unreachable_is_a_failure(types: dict) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    action = types["webhook"].factory({"url": f"http://127.0.0.1:{port}/"})
    with pytest.raises(ActionError, match="cannot POST"):
        action.run(guide_pop())


def test_webhook_through_the_dispatcher(types: dict, endpoint: Endpoint) -> None:
    configured = configure_action(
        types, "crm_hook", {"plugin": "webhook", "url": endpoint.url + "/"}
    )
    results: list = []

    async def scenario() -> None:
        dispatcher = ActionDispatcher([configured], on_result=lambda n, p, o: results.append(o))
        dispatcher.submit(guide_pop())
        assert await dispatcher.drain(10)
        dispatcher.close()

    asyncio.run(scenario())
    assert [o.status for o in results] == ["ok"]
    assert len(endpoint.requests) == 1


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({}, "url"),
        ({"url": "ftp://x/"}, "url"),
        ({"url": "http://x/", "headers": {"A": 1}}, "headers.A"),
    ],
)
def test_webhook_config_errors(types: dict, table: dict, key: str) -> None:
    with pytest.raises(ActionConfigError) as caught:
        types["webhook"].factory(table)
    assert caught.value.key == key


# -- notify: a fake notify-send on PATH --------------------------------------------------------
@pytest.fixture
def fake_notify_send(tmp_path: Path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.json"
    script = bin_dir / "notify-send"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"json.dump(sys.argv[1:], open({str(record)!r}, 'w', encoding='utf-8'))\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return record


def test_notify_runs_notify_send_with_an_argv(types: dict, fake_notify_send: Path) -> None:
    action = types["notify"].factory(
        {
            "title": "{media} from {source}",
            "body": "{queue_name} · {wait_time} s",
            "urgency": "critical",
        }
    )
    action.run(guide_pop(source="-u low; rm -rf ~"))
    argv = json.loads(fake_notify_send.read_text(encoding="utf-8"))
    assert argv == [
        "--app-name=spop",
        "--urgency=critical",
        "--",  # a caller's number that starts with a dash stays text
        "telephone from -u low; rm -rf ~",
        "File d'attente des ventes · 10 s",
    ]


def test_notify_defaults(types: dict, fake_notify_send: Path) -> None:
    types["notify"].factory({"expire_ms": 5000}).run(guide_pop())
    argv = json.loads(fake_notify_send.read_text(encoding="utf-8"))
    assert argv[:3] == ["--app-name=spop", "--urgency=normal", "--expire-time=5000"]
    assert argv[4] == "telephone pop: 12345"


def test_notify_without_notify_send_is_a_clear_skip(
    types: dict, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ActionSkipped, match="notify-send not found on PATH"):
        types["notify"].factory({}).run(guide_pop())


def test_notify_failure_reports_its_stderr(types: dict, tmp_path: Path, monkeypatch) -> None:
    script = tmp_path / "notify-send"
    script.write_text("#!/bin/sh\necho 'no session bus' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/bin")
    with pytest.raises(ActionError, match="notify-send exited 1: no session bus"):
        types["notify"].factory({}).run(guide_pop())


def test_notify_config_errors(types: dict) -> None:
    with pytest.raises(ActionConfigError) as caught:
        types["notify"].factory({"urgency": "extreme"})
    assert caught.value.key == "urgency"
    with pytest.raises(ActionConfigError) as caught:
        types["notify"].factory({"title": "{caller}"})
    assert caught.value.key == "title"
