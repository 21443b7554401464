"""`spop listen --json` writes the lines of a loop iteration with one flush: every line must still
be on standard output before the hub hears the pop was handled (acks mean handled)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

from conftest import HubThread, wait_for
from guide_pops import GUIDE_POP


def readable_now(fd: int) -> bytes:
    """What the pipe holds at this instant, without waiting for more."""
    data = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data


def acked(hub: HubThread) -> int:
    return int(hub.status()["counters"].get("acked", 0))


def test_every_json_line_is_out_before_its_ack(hub: HubThread, tmp_path: Path) -> None:
    env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    for name in ("SPOP_CONFIG", "SPOP_SERVER", "SPOP_TOKEN"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "spop_cli", "listen", "telephone", "13579"]
        + ["--server", hub.address, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        fd = process.stdout.fileno()
        assert wait_for(lambda: hub.status()["registrations"] == 1, timeout=20)
        lines = 0
        for batch in (1, 25, 1, 3):  # one pop alone, many in one iteration, again alone
            expected = acked(hub) + batch
            hub.publish([{**GUIDE_POP, "resource": "13579"} for _ in range(batch)])
            assert wait_for(lambda expected=expected: acked(hub) == expected, timeout=20)
            got = readable_now(fd).count(b"\n")  # acked: so already written to the pipe
            assert got == batch
            lines += got
        assert lines == 30
    finally:
        process.terminate()
        process.wait(20)
