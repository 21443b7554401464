"""Many real `AsyncListener`s in one process (uvloop), for the hub-restart measurement.

    python benchmarks/_restart.py --port P --n 1000 --interval 2

Brings N listeners to Status_Up (telephone, resources 100000…), answers {"ready": …}, then on
`{"cmd": "watch"}` answers once every listener has left Status_Up and come back to it (or a timeout):
the monotonic time the first one went down and the time the last one was Up again.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from typing import Any

import orjson
from _common import answer, raise_nofile, resource_name, run_fast

from spop_cli.listener.core import AsyncListener
from spop_cli.model import ListenerStatus

UP = ListenerStatus.Status_Up


class Watch:
    def __init__(self, n: int) -> None:
        self.n = n
        self.up = 0
        self.first_down = 0
        self.all_up = 0
        self.changes = 0
        self.armed = False
        self.back: asyncio.Event = asyncio.Event()

    def changed(self, old: ListenerStatus, new: ListenerStatus) -> None:
        self.changes += 1
        if new is UP:
            self.up += 1
        elif old is UP:
            self.up -= 1
            if self.armed and not self.first_down:
                self.first_down = time.monotonic_ns()
        if self.armed and self.first_down and self.up == self.n and not self.all_up:
            self.all_up = time.monotonic_ns()
            self.back.set()


async def run(args: argparse.Namespace) -> None:
    watch = Watch(args.n)
    address = f"{args.port}@127.0.0.1"
    listeners: list[AsyncListener] = []
    t0 = time.monotonic()
    semaphore = asyncio.Semaphore(100)

    async def bring_up(index: int) -> None:
        listener = AsyncListener("telephone", reconnecting_interval=args.interval, timeout=30)
        listener.on_status_changed(watch.changed)
        async with semaphore:
            await listener.initialize(address)
            await listener.start_listening(resource_name(index))
        listeners.append(listener)

    await asyncio.gather(*(bring_up(i) for i in range(args.n)))
    answer({"ready": True, "up": watch.up, "seconds": time.monotonic() - t0})

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd: dict[str, Any] = orjson.loads(line)
        if cmd["cmd"] == "arm":
            watch.armed = True
            watch.first_down = watch.all_up = 0
            watch.back.clear()
            answer({"armed": True, "up": watch.up})
        elif cmd["cmd"] == "watch":
            try:
                await asyncio.wait_for(watch.back.wait(), cmd.get("timeout", 60))
            except TimeoutError:
                pass
            statuses = Counter(listener.status.value for listener in listeners)
            answer(
                {
                    "first_down_ns": watch.first_down,
                    "all_up_ns": watch.all_up,
                    "up": watch.up,
                    "statuses": dict(statuses),
                }
            )
        elif cmd["cmd"] == "quit":
            break
    for listener in listeners:
        listener.reconnecting_interval = 0.05
    await asyncio.gather(*(lst.shutdown() for lst in listeners), return_exceptions=True)
    answer({"bye": True})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args()
    raise_nofile()
    run_fast(run(args))


if __name__ == "__main__":
    main()
