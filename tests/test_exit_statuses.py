"""One test per row of docs/cli.md's exit-status table: each status produced for real.

The codes a listener only gets from a hub's answer (Cannot_Register, Wrong_Status, …) come from
a scripted hub: a real loopback socket that speaks the protocol and answers as told.
"""

from __future__ import annotations

import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from spop_cli.cli import EXIT_CODES, cli

ROOT = Path(__file__).resolve().parents[1]
from conftest import HubThread  # noqa: E402


def documented_rows() -> dict[int, str]:
    """status → meaning, from the table under `## Exit statuses` in docs/cli.md."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    table = text.split("## Exit statuses", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        match = re.match(r"\| (\d+) \| (.*?) \|", line)
        if match:
            rows[int(match.group(1))] = match.group(2)
    return rows


ROWS = documented_rows()


def test_the_table_and_the_code_agree() -> None:
    for code, status in EXIT_CODES.items():
        assert f"`{code}`" in ROWS[status], (status, code)
    assert sorted(ROWS) == list(range(17))
    assert sorted(ROWS) == sorted(CASES)  # every row has its case below


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch) -> None:
    for name in ("SPOP_CONFIG", "SPOP_SERVER", "SPOP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPOP_DIAG_DIR", str(tmp_path / "diag"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("spop_cli.config.default_config_path", lambda: tmp_path / "none.toml")


def spop(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def spop_process(*args: str, cwd: Path | None = None, timeout: float = 60) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "spop_cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )
    return result.returncode, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ScriptedHub:
    """Answers `hello` with `welcome` (or `hello_reply`) and `register` with `register_reply`."""

    def __init__(self, hello_reply: bytes | None = None, register_reply: dict | None = None):
        script = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    frame = json.loads(line)
                    ref = frame.get("ref")
                    if frame["op"] == "hello":
                        reply = (
                            script.hello_reply
                            or json.dumps(
                                {"op": "welcome", "version": 1, "ref": ref, "heartbeat": 10}
                            ).encode()
                        )
                        self.wfile.write(reply.replace(b"REF", json.dumps(ref).encode()) + b"\n")
                    elif frame["op"] == "register":
                        answer = {**(script.register_reply or {"op": "ok"}), "ref": ref}
                        self.wfile.write(json.dumps(answer).encode() + b"\n")
                    elif frame["op"] in ("bye", "unregister"):
                        self.wfile.write(json.dumps({"op": "ok", "ref": ref}).encode() + b"\n")

        self.hello_reply = hello_reply
        self.register_reply = register_reply
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # shutdown() waits for the serve loop's next poll: 0.5 s by default, per test
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        self.address = f"{self.server.server_address[1]}@127.0.0.1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def real_hub() -> Iterator[HubThread]:
    hub = HubThread()
    yield hub
    hub.close()


def refused_register(code: str) -> tuple[int, str]:
    hub = ScriptedHub(register_reply={"op": "error", "code": code, "message": "scripted"})
    try:
        return spop_process("listen", "telephone", "13579", "--server", hub.address, "--plain")
    finally:
        hub.close()


def case_0(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    return spop("send", "telephone", "13579", "--server", real_hub.address)


def case_1(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    port = real_hub.options["port"]  # taken by the other hub
    return spop_process("serve", "--port", str(port), "--http-port", "-1", "--no-journal")


def case_2(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    return spop("send", "fax", "13579")


def case_3(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    return spop("send", "telephone", "13579", "--server", f"{free_port()}@127.0.0.1")


def case_4(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    return refused_register("SCREENPOP_Cannot_Register")


def case_5(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    return spop("send", "telephone", "13579", "--server", "6000@")


def case_6(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    (tmp_path / "afile").write_text("")
    os.environ["SPOP_DIAG_DIR"] = str(tmp_path / "afile")
    return spop("diag", "path")


def case_7(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    return refused_register("SCREENPOP_Wrong_Status")


def case_8(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    return refused_register("SCREENPOP_Already_Registered")


def case_9(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    hub = ScriptedHub(hello_reply=b"this is not a frame")
    try:
        return spop_process("listen", "telephone", "13579", "--server", hub.address, "--plain")
    finally:
        hub.close()


def case_10(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    full = b'{"op":"error","ref":REF,"code":"SCREENPOP_Memory_Allocation_Error","message":"hub at its connection limit","fatal":true}'
    hub = ScriptedHub(hello_reply=full)
    try:
        return spop("send", "telephone", "13579", "--server", hub.address)
    finally:
        hub.close()


def case_11(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    return refused_register("SCREENPOP_Wrong_Key")


def case_12(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    config = tmp_path / "bad.toml"
    config.write_text('[[listeners]]\nmedia = "fax"\nresource = "1"\n')
    return spop("config", "check", "--config", str(config))


def case_13(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    return spop("send", "telephone", "13579", "--server", real_hub.address, "--id", "x" * 200)


def case_14(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    def publish_soon() -> None:
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(r["resource"] == "13579" for r in real_hub.status()["listeners"]):
                real_hub.publish({"media": "telephone", "resource": "13579"})
                return
            time.sleep(0.05)

    threading.Thread(target=publish_soon, daemon=True).start()
    config = tmp_path / "fails.toml"
    config.write_text('[actions.fails]\nplugin = "command"\nargv = ["false"]\n')
    return spop_process(
        "listen", "telephone", "13579", "--server", real_hub.address, "--config", str(config),
        "--action", "fails", "--once", "--timeout", "30",
    )  # fmt: skip


def case_15(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    return spop_process(
        "listen", "telephone", "13579", "--server", real_hub.address, "--once", "--timeout", "0.5"
    )


def case_16(tmp_path: Path, real_hub: HubThread) -> tuple[int, str]:
    hub = HubThread(journal=str(tmp_path / "journal.sqlite3"))
    try:

        async def fill() -> None:  # SQLite's own cap at the pages it has: a real SQLITE_FULL
            assert hub.hub is not None
            db = hub.hub.journal._db  # type: ignore[union-attr]
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {pages}")

        hub.call(fill())
        big = "big=" + "x" * 4000  # a row over a page: it needs new pages
        return spop("send", "telephone", "13579", "--server", hub.address, "--data", big)
    finally:
        hub.close()


CASES = {
    int(name.removeprefix("case_")): fn
    for name, fn in dict(globals()).items()
    if name.startswith("case_")
}
# What the message must name, where the table gives one.
SAYS = {
    1: "spop: error: cannot listen:",
    2: "Invalid value for 'MEDIA'",
    3: "SCREENPOP_Cannot_Find_HiPath_ProCenter",
    4: "SCREENPOP_Cannot_Register",
    5: "SCREENPOP_Initialization_Error",
    6: "SCREENPOP_Cannot_Create_Diags",
    7: "SCREENPOP_Wrong_Status",
    8: "SCREENPOP_Already_Registered",
    9: "SCREENPOP_Framework_Error",
    10: "SCREENPOP_Memory_Allocation_Error",
    11: "SCREENPOP_Wrong_Key",
    12: 'listeners[0].media = "fax": unknown media',
    13: "spop: error: rejected by the hub",
    14: "spop: error: actions failed: 1 failure",
    15: "spop: error: timeout: 0 of 1 pop in 0.5 s",
    16: "spop: error: the hub cannot take it now (journal_unavailable): SCREENPOP_Framework_Error: "
    "the journal cannot be written (the disk is full): nothing was accepted; retry later\n",
}


@pytest.mark.parametrize("status", sorted(ROWS))
def test_each_row_of_the_table(status: int, tmp_path: Path, real_hub: HubThread) -> None:
    code, output = CASES[status](tmp_path, real_hub)
    assert code == status, output
    if status in SAYS:
        assert SAYS[status] in output, output


@pytest.mark.parametrize("address", ["6000@", "abc@host", "99999@localhost", "[::1"])
@pytest.mark.parametrize("command", ["send", "simulate", "status", "listen"])
def test_a_bad_hub_address_is_exit_5_for_every_command(command: str, address: str) -> None:
    args = {
        "send": ["send", "telephone", "13579"],
        "simulate": ["simulate", "routed-call"],
        "status": ["status"],
        "listen": ["listen", "telephone", "13579"],
    }[command]
    code, output = spop(*args, "--server", address)
    assert code == 5, output
    assert "SCREENPOP_Initialization_Error" in output


@pytest.mark.parametrize("command", ["send", "simulate", "status", "listen"])
def test_a_bad_address_from_the_environment_or_file_is_exit_5_too(
    command: str, tmp_path: Path, monkeypatch
) -> None:
    args = {
        "send": ["send", "telephone", "13579"],
        "simulate": ["simulate", "routed-call"],
        "status": ["status"],
        "listen": ["listen", "telephone", "13579"],
    }[command]
    monkeypatch.setenv("SPOP_SERVER", "abc@host")
    code, output = spop(*args)
    assert code == 5, output
    assert "(from SPOP_SERVER)" in output
    monkeypatch.delenv("SPOP_SERVER")
    config = tmp_path / "c.toml"
    config.write_text('[server]\naddress = "99999@localhost"\n')
    code, output = spop(*args, "--config", str(config))
    assert code == 5, output
    assert "port 99999 out of range" in output
