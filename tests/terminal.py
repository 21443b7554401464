"""A real pseudo-terminal for `spop` and a terminal emulator (pyte) reading it: tests assert on the
screen a person would see, after every cursor move and erase, not on the raw byte stream."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pyte


class Terminal:
    """`spop ARGS` on a pty of `columns` x `lines`, its output fed to a pyte screen."""

    def __init__(
        self,
        *args: str,
        tmp_path: Path,
        columns: int = 160,
        lines: int = 45,
        env: dict | None = None,
    ) -> None:
        self.screen = pyte.HistoryScreen(columns, lines, history=10_000)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        full_env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag"), "TERM": "xterm-256color"}
        for name in ("SPOP_CONFIG", "SPOP_SERVER", "SPOP_TOKEN", "COLUMNS", "LINES", "NO_COLOR"):
            full_env.pop(name, None)
        full_env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")  # never the user's own config file
        full_env.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "spop_cli", *args],
            env=full_env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master

    def pump(self, seconds: float = 0.05) -> None:
        """Feed whatever the program wrote within `seconds` to the screen."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if not select.select([self.master], [], [], max(left, 0))[0]:
                return
            try:
                data = os.read(self.master, 65536)
            except OSError:  # the program is gone and the pty closed
                return
            if not data:
                return
            self.raw += data
            self.stream.feed(data)

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def scrollback(self) -> str:
        """The lines scrolled off the top, oldest first, then the screen: what scrolling up shows."""
        columns = self.screen.columns
        old = [
            "".join(line[x].data for x in range(columns)).rstrip()
            for line in self.screen.history.top
        ]
        return "\n".join([*old, self.text()])

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 20.0) -> bool:
        """Until the screen satisfies `predicate` (True), or the time is up (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump(0.02)  # a frame is one write: whole once read; 0.1 s made each wait end late
            if predicate(self.text()):
                return True
        return predicate(self.text())

    def finish(self, timeout: float = 20.0) -> int:
        """Read until the program exits; its exit status."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self.pump(0.1)
        self.pump(0.2)
        return self.process.wait(5)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        os.close(self.master)
