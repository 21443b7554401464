"""Instructions per pop on the hub's batched ingest path, counted by valgrind: free of machine noise.

    python benchmarks/ingest_instructions.py [--src DIR] [--rounds 10,40]

CPU time per pop on a shared 2-core machine moves by ±30 % from run to run; an instruction count
does not. This runs the hub's own code in one process, under `valgrind --tool=callgrind`: a hub
with its SQLite journal, 1,000 listener connections (real `HubConnection`s on a transport that
drops what is written), `Hub.publish` of 100-pop bodies (validation, frames, journal, delivery
once committed) and an `ack` frame per pop fed to its connection. HTTP parsing and the kernel's
side of the system calls are not in it (product_paths.py measures those); the executor thread's
SQLite work is. Two runs with different round counts, the difference divided by the pops between
them: start-up, imports and connection set-up cancel out. `--src` runs another tree (e.g. a
`git worktree` of an older commit) for a before/after; valgrind must be installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import callgrind_child

HERE = Path(__file__).resolve().parent
BATCH = 100
LISTENERS = 1000


def listener_connections(hub: object, count: int, hello: bytes) -> list[object]:
    """`count` real `HubConnection`s on transports that drop what is written, each said `hello`
    and registered for its own key (telephone, 100000 + i): the hub's side of N listeners."""
    import orjson

    from spop_cli.hub.connection import HubConnection

    conns = []
    for i in range(count):
        conn = HubConnection(hub)  # type: ignore[arg-type]
        conn.connection_made(_Dropping())  # type: ignore[arg-type]
        conn.data_received(hello)
        register = {"op": "register", "media": "telephone", "resource": str(100000 + i)}
        conn.data_received(orjson.dumps(register) + b"\n")
        conns.append(conn)
    return conns


class _Dropping:
    """A transport that takes every write and drops it."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 1)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


async def _work(rounds: int) -> None:
    import orjson

    sys.path.insert(0, str(HERE))
    from _http_load import pop_body

    from spop_cli.hub.server import Hub, HubConfig

    tmp = tempfile.mkdtemp(prefix="spop-instr-")
    hub = Hub(HubConfig(port=0, http_port=None, journal=os.path.join(tmp, "journal.sqlite3")))
    await hub.start()
    conns = listener_connections(hub, LISTENERS, b'{"op":"hello","version":1,"role":"listener"}\n')
    bodies = [
        orjson.loads(
            orjson.dumps([pop_body("b", r * BATCH + k, LISTENERS, 0) for k in range(BATCH)])
        )
        for r in range(rounds)
    ]
    for r, body in enumerate(bodies):
        await hub.publish(body)
        await asyncio.sleep(0)  # delivered once committed
        for k in range(BATCH):
            seq = r * BATCH + k
            conns[seq % LISTENERS].data_received(b'{"op":"ack","ids":["b-%d"]}\n' % seq)
    await asyncio.sleep(0.3)  # the dones committed
    acked = hub.delivery.counters()["acked"]
    await hub.stop()
    if acked != rounds * BATCH:
        raise SystemExit(f"{acked} of {rounds * BATCH} pops acked")


def _count(src: str | None, rounds: int) -> int:
    return callgrind_child(__file__, src, str(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", help="a source tree to run instead of the installed spop_cli")
    parser.add_argument("--rounds", default="10,40", help="two round counts of 100 pops each")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        try:
            import uvloop

            uvloop.run(_work(args.child))
        except ImportError:
            asyncio.run(_work(args.child))
        return
    low, high = (int(x) for x in args.rounds.split(","))
    started = time.monotonic()
    a, b = _count(args.src, low), _count(args.src, high)
    per_pop = (b - a) / ((high - low) * BATCH)
    print(
        f"{per_pop:,.0f} instructions per pop ({low} and {high} rounds of {BATCH} pops, "
        f"{LISTENERS:,} listener connections; {time.monotonic() - started:.0f} s under valgrind)"
    )


if __name__ == "__main__":
    main()
