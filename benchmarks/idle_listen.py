"""CPU of an idle `spop listen` with its live view: a real hub, the listener on a pseudo-terminal.

    python benchmarks/idle_listen.py [--seconds 10] [--src PATH]

`--src` runs another checkout's `src` folder (to compare before and after a change). Prints the
listener's CPU use over the window as a percentage of one core (user + system time / wall time).
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--src", default=str(ROOT / "src"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="spop-idle-"))
    env = {
        **os.environ,
        "PYTHONPATH": args.src,
        "SPOP_DIAG_DIR": str(tmp),
        "COLUMNS": "160",
        "LINES": "45",
    }
    for name in ("SPOP_CONFIG", "SPOP_SERVER", "SPOP_TOKEN"):
        env.pop(name, None)
    ready = tmp / "ready.json"
    hub = subprocess.Popen(
        [sys.executable, "-m", "spop_cli", "serve", "--port", "0", "--http-port", "-1",
         "--no-journal", "--ready-file", str(ready)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        import json

        port = json.loads(ready.read_text())["port"]
        master, slave = pty.openpty()
        listener = subprocess.Popen(
            [sys.executable, "-m", "spop_cli", "listen", "telephone", "13579",
             "--server", f"{port}@127.0.0.1"],
            env=env, stdin=slave, stdout=slave, stderr=slave,
        )  # fmt: skip
        os.close(slave)

        def drain(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                if select.select([master], [], [], 0.1)[0]:
                    try:
                        os.read(master, 65536)
                    except OSError:
                        return

        drain(3.0)  # started, connected, first frames drawn
        process = psutil.Process(listener.pid)
        before, started = process.cpu_times(), time.monotonic()
        drain(args.seconds)
        after, wall = process.cpu_times(), time.monotonic() - started
        used = (after.user - before.user) + (after.system - before.system)
        print(
            f"idle spop listen (live view): {100 * used / wall:.2f} % of one core over {wall:.1f} s"
        )
        listener.terminate()
        listener.wait(10)
        os.close(master)
    finally:
        hub.terminate()
        hub.wait(10)


if __name__ == "__main__":
    main()
