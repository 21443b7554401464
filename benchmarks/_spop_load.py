"""Load processes for the spop hub, speaking the NDJSON listener protocol directly (docs/protocol.md).

    python benchmarks/_spop_load.py listeners --port P --n N --conns C
    python benchmarks/_spop_load.py publisher --port P [--ports P1,P2,P3]

`listeners`: N registrations (telephone, resources 100000…) over C connections, asyncio protocols on
uvloop. The "action" is the receiving callback: it stamps the time, counts the pop id and acks the
pop (one `ack` frame per pop, the frames of one read written together). A dropped connection
(e.g. the hub's slow-consumer policy) reconnects and registers again, as AsyncListener does.

`publisher`: one source connection; a sender thread sends `publish` frames at their intended times
(open loop, pipelined: it never waits for the `ok`s) or as fast as a window of unanswered pops
allows (throughput); a reader thread counts the `ok`s.

Both read JSON commands on stdin and answer one JSON line each on stdout (see fanout.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import threading
import time
from typing import Any

import orjson
from _common import (
    MEDIA,
    Recorder,
    answer,
    load_args,
    resource_name,
    run_fast,
    source_pop,
    split_id,
    wait_count,
)

monotonic_ns = time.monotonic_ns
loads = orjson.loads
dumps = orjson.dumps

# ----------------------------------------------------------------------------------- listeners


class Fleet:
    def __init__(self, host: str, port: int, n: int, conns: int) -> None:
        self.host, self.port, self.n = host, port, n
        self.conns = max(1, min(conns, n))
        self.runs: dict[str, Recorder] = {}
        self.links: list[LeanLink] = []
        self.reconnects = 0
        self.errors: list[str] = []
        self.closing = False
        self.ports: list[int] = []  # several hubs: connection i goes to ports[i % n]

    def recorder(self, run: str) -> Recorder:
        rec = self.runs.get(run)
        if rec is None:
            rec = self.runs[run] = Recorder()
        return rec

    def resources_of(self, index: int) -> list[str]:
        return [resource_name(i) for i in range(index, self.n, self.conns)]

    async def open_all(self, parallel: int = 256) -> None:
        semaphore = asyncio.Semaphore(parallel)

        async def one(index: int) -> None:
            async with semaphore:
                self.links.append(await self.open(index))

        await asyncio.gather(*(one(i) for i in range(self.conns)))

    async def open(self, index: int) -> LeanLink:
        loop = asyncio.get_running_loop()
        for attempt in range(50):
            try:
                port = self.ports[index % len(self.ports)] if self.ports else self.port
                _, link = await loop.create_connection(
                    lambda: LeanLink(self, index), self.host, port
                )
                await link.handshake(self.resources_of(index))
                return link
            except (OSError, ConnectionError, TimeoutError) as exc:
                if attempt == 49:
                    raise
                self.note(f"connect {index}: {exc!r}")
                await asyncio.sleep(0.1)
        raise AssertionError("unreachable")

    def lost(self, link: LeanLink) -> None:
        if self.closing:
            return
        self.reconnects += 1

        async def again() -> None:
            await asyncio.sleep(0.05)
            with contextlib.suppress(ValueError):
                self.links.remove(link)
            self.links.append(await self.open(link.index))

        asyncio.get_running_loop().create_task(again())

    def note(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)


class LeanLink(asyncio.Protocol):
    __slots__ = ("fleet", "index", "transport", "buffer", "waiting", "want_ok", "ready")

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.want_ok = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    async def handshake(self, resources: list[str]) -> None:
        assert self.transport is not None
        self.want_ok = 1 + len(resources)  # welcome + one ok per register
        frames = [
            dumps({"op": "hello", "version": 1, "ref": 0, "role": "listener", "client": "bench"})
        ]
        frames += [
            dumps({"op": "register", "ref": i + 1, "media": MEDIA, "resource": r})
            for i, r in enumerate(resources)
        ]
        self.transport.write(b"\n".join(frames) + b"\n")
        await asyncio.wait_for(self.ready, 60)

    def data_received(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        acks = []
        fleet = self.fleet
        for line in lines:
            if line.startswith(b'{"op":"pop"'):
                pop = loads(line)["pop"]
                now = monotonic_ns()
                pop_id = pop["id"]
                run, seq = split_id(pop_id)
                rec = fleet.runs.get(run) or fleet.recorder(run)
                data = pop["contact_data"]
                rec.hit(seq, now - int(data["t"]), now, now - int(data["s"]))
                acks.append(b'{"op":"ack","id":"' + pop_id.encode() + b'"}\n')
            elif not line:
                continue
            else:
                frame = loads(line)
                op = frame.get("op")
                if op == "ping":
                    acks.append(b'{"op":"pong"}\n')
                elif op in ("ok", "welcome"):
                    self.want_ok -= 1
                    if self.want_ok == 0 and not self.ready.done():
                        self.ready.set_result(None)
                elif op == "error":
                    fleet.note(f"error frame: {frame}")
                    if not self.ready.done():
                        self.ready.set_exception(ConnectionError(str(frame)))
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"lost during handshake: {exc!r}"))
            return
        self.fleet.lost(self)


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run_listeners(args: argparse.Namespace) -> None:
    fleet = Fleet(args.host, args.port, args.n, args.conns)
    fleet.ports = [int(p) for p in args.ports.split(",") if p] or [args.port]
    t0 = time.monotonic()
    await fleet.open_all()
    answer(
        {
            "ready": True,
            "registrations": fleet.n,
            "connections": fleet.conns,
            "seconds": time.monotonic() - t0,
        }
    )
    reader = await stdin_lines()
    while line := await reader.readline():
        cmd = loads(line)
        what = cmd["cmd"]
        if what == "count":
            rec = fleet.runs.get(cmd["run"])
            answer({"unique": rec.unique() if rec else 0, "received": rec.total if rec else 0})
        elif what == "report":
            rec = fleet.runs.get(cmd["run"]) or Recorder()
            answer(rec.report(cmd.get("expected")))
        elif what == "drop":
            fleet.runs.pop(cmd["run"], None)
            answer({"ok": True})
        elif what == "info":
            answer(
                {"reconnects": fleet.reconnects, "errors": fleet.errors, "links": len(fleet.links)}
            )
        elif what == "quit":
            break
    fleet.closing = True
    for link in fleet.links:
        if link.transport is not None:
            link.transport.close()
    answer({"bye": True})


# ----------------------------------------------------------------------------------- publisher


class Publisher:
    """One source connection per hub port; publish frames go to them in turn, as a load
    balancer in front of a cluster's hubs spreads a source's requests."""

    def __init__(self, host: str, ports: list[int]) -> None:
        self.cond = threading.Condition()
        self.oks = 0
        self.errors: list[str] = []
        self.error_count = 0
        self.last_ok_ns = 0
        self.turn = 0  # frames sent so far: the next goes to connection turn % len(socks)
        self.socks: list[socket.socket] = []
        self.locks: list[threading.Lock] = []
        for port in ports:
            sock = socket.create_connection((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = {"op": "hello", "version": 1, "ref": "h", "role": "source", "client": "bench"}
            sock.sendall(dumps(hello) + b"\n")
            rest = b""
            while b"\n" not in rest:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("hub closed during the handshake")
                rest += chunk
            first, _, rest = rest.partition(b"\n")
            if loads(first).get("op") != "welcome":
                raise ConnectionError(first.decode())
            self.socks.append(sock)
            self.locks.append(threading.Lock())
            index = len(self.socks) - 1
            threading.Thread(target=self.read_loop, args=(index, rest), daemon=True).start()

    def send(self, frames: list[bytes]) -> None:
        """Each frame to the next connection in turn; one write per connection."""
        count = len(self.socks)
        groups: list[list[bytes]] = [[] for _ in range(count)]
        for k, frame in enumerate(frames):
            groups[(self.turn + k) % count].append(frame)
        self.turn += len(frames)
        for to, part in enumerate(groups):
            if part:
                with self.locks[to]:
                    self.socks[to].sendall(b"\n".join(part) + b"\n")

    def read_loop(self, index: int, buffer: bytes) -> None:
        sock, lock = self.socks[index], self.locks[index]
        while True:
            try:
                chunk = sock.recv(1 << 18)
            except OSError:
                chunk = b""
            if not chunk:
                with self.cond:
                    self.errors.append("hub closed the source connection")
                    self.cond.notify_all()
                return
            lines = (buffer + chunk).split(b"\n")
            buffer = lines.pop()
            oks = 0
            for line in lines:
                if line.startswith(b'{"op":"ok"'):
                    ids = loads(line).get("ids")
                    oks += len(ids) if ids is not None else 1
                elif line.startswith(b'{"op":"ping"'):
                    with lock:
                        sock.sendall(b'{"op":"pong"}\n')
                elif line:
                    self.error_count += 1
                    if len(self.errors) < 10:
                        self.errors.append(line[:300].decode(errors="replace"))
            if oks:
                with self.cond:
                    self.oks += oks
                    self.last_ok_ns = monotonic_ns()
                    self.cond.notify_all()

    def wait_oks(self, target: int, timeout: float) -> bool:
        return wait_count(self.cond, lambda: self.oks, target, timeout)

    def open_loop(self, run: str, rate: float, duration: float, n: int) -> dict[str, Any]:
        """Each pop at its intended time start + i/rate; the time is in the pop, not the send."""
        total = max(1, int(rate * duration))
        period = 1e9 / rate
        base = self.oks
        start = monotonic_ns() + 2_000_000
        i = 0
        max_lag = 0
        frames: list[bytes] = []
        while i < total:
            now = monotonic_ns()
            intended = start + int(i * period)
            if now < intended:
                time.sleep((intended - now) / 1e9)
                continue
            due = min(total, int((now - start) / period) + 1)
            max_lag = max(max_lag, now - intended)
            frames.clear()
            for j in range(i, due):
                pop = source_pop(
                    f"{run}-{j}", resource_name(j % n), start + int(j * period), monotonic_ns()
                )
                frames.append(dumps({"op": "publish", "ref": j, "pops": pop}))
            self.send(frames)
            i = due
        sent_end = monotonic_ns()
        complete = self.wait_oks(base + total, 30 + duration)
        return {
            "sent": total,
            "oks": self.oks - base,
            "complete": complete,
            "start_ns": start,
            "send_seconds": (sent_end - start) / 1e9,
            "max_send_lag_ms": round(max_lag / 1e6, 3),
            "errors": self.errors[-5:],
            "error_count": self.error_count,
        }

    def window(self, run: str, total: int, window: int, batch: int, n: int) -> dict[str, Any]:
        """As fast as `window` unanswered pops allow, `batch` pops per publish frame."""
        base = self.oks
        start = monotonic_ns()
        sent = 0
        while sent < total:
            with self.cond:
                while sent - (self.oks - base) >= window and not self.errors:
                    self.cond.wait(1.0)
                if self.errors and self.errors[-1].startswith("hub closed"):
                    break
                room = min(window - (sent - (self.oks - base)), total - sent)
            frames = []
            now = monotonic_ns()
            end = sent + room
            while sent < end:
                k = min(batch, end - sent)
                pops = [
                    source_pop(f"{run}-{j}", resource_name(j % n), now, now)
                    for j in range(sent, sent + k)
                ]
                frames.append(
                    dumps({"op": "publish", "ref": sent, "pops": pops if batch > 1 else pops[0]})
                )
                sent += k
            self.send(frames)
        sent_end = monotonic_ns()
        complete = self.wait_oks(base + total, 60)
        return {
            "sent": sent,
            "oks": self.oks - base,
            "complete": complete,
            "start_ns": start,
            "send_seconds": (sent_end - start) / 1e9,
            "oks_seconds": (self.last_ok_ns - start) / 1e9,
            "errors": self.errors[-5:],
            "error_count": self.error_count,
        }


def run_publisher(args: argparse.Namespace) -> None:
    sys.setswitchinterval(0.0005)  # the sender thread must not wait 5 ms for the reader's GIL
    # --ports: the source's frames spread over several hubs (benchmarks/cluster.py --spread)
    ports = [int(p) for p in args.ports.split(",") if p] or [args.port]
    pub = Publisher(args.host, ports)
    answer({"ready": True})
    for line in sys.stdin.buffer:
        cmd = loads(line)
        what = cmd["cmd"]
        if what == "open":
            answer(pub.open_loop(cmd["run"], cmd["rate"], cmd["duration"], cmd["n"]))
        elif what == "window":
            answer(pub.window(cmd["run"], cmd["total"], cmd["window"], cmd["batch"], cmd["n"]))
        elif what == "quit":
            break
    answer({"bye": True})


def main() -> None:
    args = load_args(["listeners", "publisher"])
    if args.role == "publisher":
        run_publisher(args)
        return
    run_fast(run_listeners(args))


if __name__ == "__main__":
    main()
