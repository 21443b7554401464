"""What `spop serve` says: its start line, `--verbose` lines, and the pops in the hub's log."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubproc import inprocess_hub, run, until  # noqa: E402
from spop_cli.cli import cli
from spop_cli.serve import log_summaries, pop_words


def serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, queue.Queue[str]]:
    env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag")}
    for name in ("SPOP_CONFIG", "SPOP_SERVER", "SPOP_TOKEN"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "spop_cli", "serve", "--port", "0", "--no-journal", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in process.stdout], daemon=True).start()
    return process, lines


def next_line(lines: queue.Queue[str], containing: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if containing in line:
            return line
    raise AssertionError(f"no line with {containing!r}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(15)


def test_http_port_minus_one_says_no_http(tmp_path: Path) -> None:
    process, lines = serve(tmp_path, "--http-port", "-1")
    try:
        line = next_line(lines, "spop hub:")
        assert "no HTTP port (--http-port -1)" in line and "None" not in line
        assert "no journal (pops in memory)" in line
    finally:
        stop(process)


def test_verbose_prints_a_line_per_connection_registration_and_pop(tmp_path: Path) -> None:
    process, lines = serve(tmp_path, "--http-port", "-1", "--verbose")
    try:
        start = next_line(lines, "spop hub:")
        port = int(start.split(" port ")[1].split(",")[0])
        address = f"{port}@127.0.0.1"
        from spop_cli import ScreenPopTelephoneListener

        listener = ScreenPopTelephoneListener()
        listener.initialize(address)
        listener.start_listening("13579")
        try:
            assert next_line(lines, " connected").rstrip().endswith(": listener connected")
            assert "registered telephone 13579" in next_line(lines, "registered")
            sent = CliRunner().invoke(
                cli, ["send", "telephone", "13579", "--server", address, "--id", "pop-v",
                      "--source", "12345", "--queue", "Ventes"],
            )  # fmt: skip
            assert sent.exit_code == 0, sent.output
            line = next_line(lines, "pop pop-v")
            assert line.rstrip().endswith(
                "pop pop-v for telephone 13579 accepted: source='12345' queue_name='Ventes'"
            )
        finally:
            listener.shutdown()
        assert (
            next_line(lines, "listener disconnected").rstrip().endswith(": listener disconnected")
        )
    finally:
        stop(process)
    log = (tmp_path / "diag" / "hub.000").read_text()
    assert "pop pop-v for telephone 13579 accepted" in log  # the hub's log records it too


def test_pop_words_names_only_the_fields_set() -> None:
    pop = {"id": "p1", "media": "email", "resource": "agent7", "source": "", "destination": "x@y"}
    assert pop_words(pop) == "pop p1 for email agent7 accepted: destination='x@y'"


def test_the_hubs_log_counts_pops_each_period(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            log = logging.getLogger("spop.test.summaries")
            task = asyncio.get_running_loop().create_task(log_summaries(hub, log, every=0.05))
            try:
                await hub.publish([{"media": "telephone", "resource": "1"}] * 3)
                assert await until(lambda: "3 accepted" in caplog.text, timeout=10)
                lines = [r.getMessage() for r in caplog.records if "accepted" in r.getMessage()]
                assert lines[0] == (
                    "pops in the last 0.05 s: 3 accepted, 0 delivered, 0 acknowledged,"
                    " 0 expired, 0 duplicates; 3 pending"
                )
                count = len(lines)
                await asyncio.sleep(0.2)  # nothing moved: no new line
                assert len([r for r in caplog.records if "accepted" in r.getMessage()]) == count
            finally:
                task.cancel()

    with caplog.at_level(logging.INFO, logger="spop.test.summaries"):
        run(body())
