"""Instructions per contact event on `POST /v1/contacts`, counted by valgrind: free of machine noise.

    python benchmarks/contact_instructions.py [--src DIR] [--rounds 8,40] [--cprofile]

The sibling of ingest_instructions.py for the contact path. It runs the hub's own code in one
process under `valgrind --tool=callgrind`: a hub with its SQLite journal and 1,000 listener
connections (real `HubConnection`s on a transport that drops what is written), and 16 HTTP/1.1
keep-alive connections of the hub's own HTTP port (the front's `FastHTTP` protocol; in a tree
from before the front, aiohttp's `RequestHandler`s) on transports that keep what is written. Each round, every connection
gets the next event of its contacts as a whole HTTP request (`data_received`): queued, routed (a
pop), answered, ended, the product-path benchmark's bodies (_http_load.contact_body); the round
ends when all 16 answers are written (16 events in flight share a journal commit, as under the
benchmark's 16 clients). The listener connections ask for contact updates, as `spop listen --json`
does: each pop (routed) and each change (answered, ended) is acked by its listener connection.
HTTP parsing, the handler, the tracker, the journal commit, delivery and the response are in it;
the kernel's side of the system calls is not. Two runs with different round counts, the
difference divided by the events between them: start-up, imports and set-up cancel out. `--src`
runs another tree (a `git worktree` of an older commit) for a before/after. `--cprofile` runs the
higher count once without valgrind under cProfile and prints where the time goes, by function.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import callgrind_child, run_fast

HERE = Path(__file__).resolve().parent
CONNS = 16
LISTENERS = 1000


class _Kept:
    """A transport that keeps what is written: the HTTP answers, read back by the driver."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.answered: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)

    def writelines(self, lines: list[bytes]) -> None:
        self.write(b"".join(lines))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name in ("peername", "sockname") else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def _request(body: bytes) -> bytes:
    return (
        b"POST /v1/contacts HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: keep-alive\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body


async def _work(rounds: int) -> None:
    import orjson

    sys.path.insert(0, str(HERE))
    from _http_load import contact_body
    from ingest_instructions import listener_connections

    from spop_cli.hub.contacts import change_id_for
    from spop_cli.hub.server import Hub, HubConfig

    tmp = tempfile.mkdtemp(prefix="spop-instr-")
    # no heartbeat within the run: slowed down by valgrind, the listeners must not look dead
    config = HubConfig(
        port=0, http_port=0, journal=os.path.join(tmp, "journal.sqlite3"), heartbeat=3600.0
    )
    hub = Hub(config)
    await hub.start()
    # What runs on a timer (housekeeping's walk over the connections every 0.2 s, the journal's
    # purge every 5 s) would count by how long the run takes, which valgrind and load set: off.
    for task in hub._tasks:
        task.cancel()
    hub.journal._last_purge = math.inf
    # protocol 2 with updates, as `spop listen --json` says: the changes come too
    hello = b'{"op":"hello","version":2,"role":"listener","updates":true}\n'
    listeners = listener_connections(hub, LISTENERS, hello)
    port = hub._http_runner
    front = getattr(port, "front", None)
    if front is not None:  # the HTTP front (fasthttp.py) answers ingest requests itself
        from spop_cli.hub.fasthttp import FastHTTP

        if front._sweeper is not None:
            front._sweeper.cancel()  # a timer, as the others above

        def connection() -> asyncio.Protocol:
            return FastHTTP(front)
    else:  # a tree from before the front: aiohttp's server makes each connection's protocol
        connection = port.server
    clients = []
    for _ in range(CONNS):
        transport = _Kept()
        protocol = connection()
        protocol.connection_made(transport)
        clients.append((protocol, transport))
    hub._gc.tick(len(hub.connections))  # as the hub's sweep does: the connections frozen
    # connection c carries contacts c, c + CONNS, ...: each contact's 4 events in order on one
    requests = [
        [
            _request(orjson.dumps(contact_body("c", 4 * (c + CONNS * (k // 4)) + k % 4, LISTENERS)))
            for k in range(rounds)
        ]
        for c in range(CONNS)
    ]
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    statuses: dict[bytes, int] = {}
    for k in range(rounds):
        waits = []
        for c, (protocol, transport) in enumerate(clients):
            transport.answered = loop.create_future()
            waits.append(transport.answered)
            protocol.data_received(requests[c][k])
        await asyncio.gather(*waits)
        for c, (_, transport) in enumerate(clients):
            status = transport.written[-1][9:12] if transport.written else b"---"
            statuses[status] = statuses.get(status, 0) + 1
            transport.written.clear()
            # what the listener got (the routed event's pop, the answered and ended changes), it
            # acks, as `spop listen` does
            if k % 4 == 0:
                continue
            contact = c + CONNS * (k // 4)
            event_id = f"c-e{4 * contact + k % 4}"
            if k % 4 > 1:
                event_id = change_id_for(event_id, str(100000 + contact % LISTENERS))
            ack = {"op": "ack", "ids": [event_id]}
            listeners[contact % LISTENERS].data_received(orjson.dumps(ack) + b"\n")
    await asyncio.sleep(0.3)  # the dones committed
    counters = hub.status()["counters"]
    await hub.stop()
    if (
        statuses != {b"200": rounds * CONNS}
        or counters.get("acked") != rounds // 4 * CONNS
        or counters.get("changes_acked") != rounds // 2 * CONNS
        or counters.get("dead_peers")
    ):
        raise SystemExit(f"answers {statuses}, counters {counters}")


def _child(rounds: int) -> None:
    run_fast(_work(rounds))


def _count(src: str | None, rounds: int) -> int:
    return callgrind_child(__file__, src, str(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", help="a source tree to run instead of the installed spop_cli")
    parser.add_argument(
        "--rounds", default="8,40", help=f"two round counts of {CONNS} events each (multiples of 4)"
    )
    parser.add_argument("--cprofile", action="store_true", help="cProfile the higher count instead")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child)
        return
    low, high = (int(x) for x in args.rounds.split(","))
    if low % 4 or high % 4:
        raise SystemExit("--rounds: multiples of 4 (a contact's 4 events)")
    if args.cprofile:
        import cProfile
        import pstats

        if args.src:
            sys.path.insert(0, args.src)
        profiler = cProfile.Profile()
        profiler.runcall(_child, high)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
        return
    started = time.monotonic()
    a, b = _count(args.src, low), _count(args.src, high)
    per_event = (b - a) / ((high - low) * CONNS)
    print(
        f"{per_event:,.0f} instructions per contact event ({low} and {high} rounds of {CONNS} "
        f"events over HTTP, {LISTENERS:,} listener connections; "
        f"{time.monotonic() - started:.0f} s under valgrind)"
    )


if __name__ == "__main__":
    main()
