"""1,000 browser streams (SSE, a plain HTTP client: no browser) on one hub at 1,000 pops/s.

    python benchmarks/browser_streams.py                 # 1,000 streams, 1,000 pops/s, 20 s, journal on
    python benchmarks/browser_streams.py --no-journal    # the same with pops in memory only
    python benchmarks/browser_streams.py --streams 100 --rate 500 --duration 5
    python benchmarks/browser_streams.py --probe --profile hub.txt   # hub stalls, GC, py-spy

Processes: the hub (`spop serve`, uvloop; under `_hub_probe.py` with `--probe`), `--clients`
stream processes (1 by default) sharing the streams, and a source posting one pop per
`POST /v1/pops` at the offered rate. A stream process is lean on purpose, so that the
measurement is the hub's: raw non-blocking sockets on a uvloop loop, a minimal SSE parser, and
acks as spop.js sends them (after the pop is handled; one ack POST in flight per page, the ids
handled meanwhile go in the next; the session cookie and the `X-Spop-CSRF` header), on a few
keep-alive connections per process.

Latency: from just before the pop's POST is written (CLOCK_MONOTONIC, system-wide on Linux) to the
moment its event is parsed off its stream. The client's part of it: from the moment the kernel
queued the event's bytes on the stream's socket (`SO_TIMESTAMPNS`) to the same moment; the rest
(`hub_part`) is the source's write, the hub and loopback. Memory per stream: the hub's RSS with
every stream open, minus before, over the count. Loopback only, free ports, a scratch directory
removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson  # noqa: E402
from _common import percentiles, raise_nofile, rss_of  # noqa: E402

TOKEN = "bench-listener"
SOURCE = "bench-source"
MEDIA = "telephone"


def resource_of(index: int) -> str:
    return str(100_000 + index)


def start_hub(
    workdir: Path, journal: bool, probe: Path | None
) -> tuple[subprocess.Popen[bytes], int]:
    ready = workdir / "ready.json"
    if probe is not None:  # GC pauses and event-loop stalls, written to `probe` on exit
        cmd = [sys.executable, str(Path(__file__).with_name("_hub_probe.py")), str(probe)]
    else:
        cmd = [sys.executable, "-m", "spop_cli"]
    cmd += ["serve", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--http-port", "0", "--ready-file", str(ready), "--token", TOKEN]
    cmd += ["--source-token", SOURCE]
    cmd += ["--journal", str(workdir / "journal.sqlite3")] if journal else ["--no-journal"]
    log = open(workdir / "hub.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"hub did not start: {(workdir / 'hub.log').read_text()}")
        time.sleep(0.05)
    return proc, int(json.loads(ready.read_text())["http_port"])


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- a lean HTTP/1.1 client ----------------------------------------------------------------
class Pool:
    """Keep-alive connections, one request at a time on each: requests go to whichever is free.
    Lean on purpose (a few dozen microseconds a request): aiohttp's client would cost the shared
    cores more than the hub it measures. Requests are built when written, so a stamp in them is
    the moment the request leaves."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future[int]]] = asyncio.Queue()
        self.workers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.size):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.workers.append(loop.create_task(self._work(reader, writer)))

    def send(self, build: Any) -> asyncio.Future[int]:
        """`build()` returns the request bytes; the future gets the answer's status."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((build, future))
        return future

    async def _work(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            build, future = await self.queue.get()
            try:
                writer.write(build())
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                future.set_result(status)
            except Exception as exc:  # the connection broke: this request failed
                future.set_exception(exc)
                return

    async def close(self) -> None:
        for worker in self.workers:
            worker.cancel()
        await asyncio.gather(*self.workers, return_exceptions=True)


def request(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- the source: its own process --------------------------------------------------------------
async def source(base: str, rate: int, duration: float, run: str) -> None:
    """POST one pop per request on a schedule (open loop), over a pool of keep-alive connections."""
    total = int(rate * duration)
    streams = int(os.environ["BENCH_STREAMS"])
    host, _, port = base.removeprefix("http://").partition(":")
    pool = Pool(host, int(port), 32)
    await pool.start()
    auth = {"Authorization": f"Bearer {SOURCE}"}
    start = time.monotonic_ns() + 100_000_000
    gap = 1_000_000_000 // rate
    answers: list[asyncio.Future[int]] = []

    def build(seq: int, intended: int) -> Any:
        def now() -> bytes:
            pop = {
                "id": f"{run}-{seq}",
                "media": MEDIA,
                "resource": resource_of(seq % streams),
                "source": "0612345678",
                "destination": "2468",
                "queue_name": "File d'attente des ventes",
                "contact_description": "Ventes",
                "wait_time": 10,
                "contact_data": {
                    "code1": "chaîne1",
                    "t": str(intended),
                    "s": str(time.monotonic_ns()),
                },
            }
            return request("POST", "/v1/pops", auth, orjson.dumps(pop))

        return now

    for seq in range(total):
        intended = start + seq * gap
        delay = (intended - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        answers.append(pool.send(build(seq, intended)))
    done = await asyncio.gather(*answers, return_exceptions=True)
    refused = sum(1 for status in done if status != 200)
    await pool.close()
    print(json.dumps({"sent": total, "refused": refused}), flush=True)


# -- the streams: lean client processes ------------------------------------------------------
TS_SPACE = socket.CMSG_SPACE(16)  # one struct timespec
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python does not name it


class Stream:
    """One browser: its SSE socket, what it still has to ack, and whether an ack is in flight
    (spop.js: one ack POST at a time per page, the ids handled meanwhile go in the next)."""

    __slots__ = ("sock", "resource", "raw", "body", "head", "to_ack", "acking", "ready")

    def __init__(self, sock: socket.socket, resource: str) -> None:
        self.sock, self.resource = sock, resource
        self.raw = b""  # chunked transfer encoding not yet decoded
        self.body = b""  # decoded SSE text not yet split into events
        self.head = False  # the HTTP response head was read
        self.to_ack: list[str] = []
        self.acking = False
        self.ready = False

    def feed(self, data: bytes) -> bytes:
        """Bytes off the socket → SSE text (HTTP head skipped, chunked framing removed)."""
        raw = self.raw + data
        if not self.head:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self.raw = raw
                return b""
            if raw[9:12] != b"200":
                raise SystemExit(f"stream refused: {raw[:200]!r}")
            self.head, raw = True, raw[end + 4 :]
        out = []
        pos = 0
        while True:
            line = raw.find(b"\r\n", pos)
            if line < 0:
                break
            size = int(raw[pos:line], 16)
            if len(raw) < line + 2 + size + 2:
                break
            out.append(raw[line + 2 : line + 2 + size])
            pos = line + 2 + size + 2
        self.raw = raw[pos:]
        return b"".join(out)


class AckConn:
    """A keep-alive connection for ack POSTs, one request at a time."""

    __slots__ = ("sock", "stream", "ids", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stream: Stream | None = None
        self.ids: list[str] = []
        self.buf = b""


class Client:
    """The streams of one client process: raw non-blocking sockets on the event loop (no
    StreamReader, no aiohttp), a minimal SSE parser, acks as spop.js sends them."""

    def __init__(self, host: str, port: int, indexes: list[int], acks: bool, pool: int) -> None:
        self.host, self.port, self.acks = host, port, acks
        self.indexes, self.pool_size = indexes, pool
        self.loop = asyncio.get_event_loop()
        self.lats = array("q")  # POST written → event parsed (monotonic ns)
        self.client_part = array("q")  # bytes in this process's socket → event parsed (ns)
        self.seen: set[str] = set()
        self.duplicates = self.acks_sent = self.acks_failed = self.ready = self.pings = 0
        self.free: list[AckConn] = []
        self.waiting: deque[Stream] = deque()  # streams with ids to ack, no free connection

    def http(self, data: bytes) -> tuple[bytes, bytes]:
        """A blocking request on a new connection (set-up only): head and body."""
        with socket.create_connection((self.host, self.port)) as sock:
            sock.sendall(data)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += sock.recv(65536)
            head, _, body = buf.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += sock.recv(65536)
            return head, body

    def start(self) -> None:
        head, body = self.http(
            request("POST", "/v1/browser/session", {}, orjson.dumps({"token": TOKEN}))
        )
        cookie = head.split(b"spop_session=")[1].split(b";")[0].decode()
        csrf = orjson.loads(body)["csrf"]
        self.ack_headers = {"Cookie": f"spop_session={cookie}", "X-Spop-CSRF": csrf}
        for _ in range(self.pool_size):
            sock = socket.create_connection((self.host, self.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            conn = AckConn(sock)
            self.loop.add_reader(sock.fileno(), self.ack_readable, conn)
            self.free.append(conn)
        for index in self.indexes:
            sock = socket.create_connection((self.host, self.port))
            resource = resource_of(index)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.sendall(
                f"GET /v1/browser/stream?media={MEDIA}&resource={resource} HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nAccept: text/event-stream\r\n"
                f"Cookie: spop_session={cookie}\r\n\r\n".encode()
            )
            sock.setblocking(False)
            stream = Stream(sock, resource)
            self.loop.add_reader(sock.fileno(), self.readable, stream)

    def readable(self, stream: Stream) -> None:
        try:
            data, ancillary, _, _ = stream.sock.recvmsg(262144, TS_SPACE)
        except BlockingIOError:
            return
        if not data:
            self.loop.remove_reader(stream.sock.fileno())
            return
        arrived = 0  # when the kernel queued these bytes for us (CLOCK_REALTIME ns)
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", value[:16])
                arrived = sec * 1_000_000_000 + nsec
        text = stream.body + stream.feed(data)
        *events, stream.body = text.split(b"\n\n")
        for event in events:
            if event.startswith(b"event: pop\n"):
                self.pop(stream, event, arrived)
            elif event.startswith(b"retry:"):
                stream.ready = True
                self.ready += 1
                self.flush_acks(stream)  # spop.js: on `ready`, acks left over go out
            elif event.startswith(b"event: ping"):
                self.pings += 1

    def pop(self, stream: Stream, event: bytes, arrived: int) -> None:
        """spop.js's handle(): parse, drop a copy already handled (ack it again), call
        onPop (here: note the latency), then ack."""
        pop = orjson.loads(event[event.index(b"\ndata: ") + 7 :])
        now, wall = time.monotonic_ns(), time.time_ns()
        pop_id = pop["id"]
        if pop_id in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(pop_id)
            self.lats.append(now - int(pop["contact_data"]["s"]))
            self.client_part.append(wall - arrived if arrived else 0)
        if self.acks:
            stream.to_ack.append(pop_id)
            self.flush_acks(stream)

    def flush_acks(self, stream: Stream) -> None:
        if stream.acking or not stream.to_ack or not stream.ready:
            return
        stream.acking = True
        if self.free:
            self.send_ack(self.free.pop(), stream)
        else:
            self.waiting.append(stream)

    def send_ack(self, conn: AckConn, stream: Stream) -> None:
        conn.stream, conn.ids, stream.to_ack = stream, stream.to_ack, []
        body = orjson.dumps({"media": MEDIA, "resource": [stream.resource], "ids": conn.ids})
        data = request("POST", "/v1/browser/ack", self.ack_headers, body)
        if conn.sock.send(data) != len(data):
            raise SystemExit("ack request not sent whole")
        self.acks_sent += 1

    def ack_readable(self, conn: AckConn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            raise SystemExit("ack connection closed by the hub")
        buf = conn.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            conn.buf = buf
            return
        head = buf[:end].lower()
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        if len(buf) < end + 4 + length:
            conn.buf = buf
            return
        conn.buf = buf[end + 4 + length :]
        stream = conn.stream
        assert stream is not None
        if head[9:12] != b"200":
            self.acks_failed += 1
            stream.to_ack[:0] = conn.ids  # spop.js: the ids go out again
        stream.acking = False
        conn.stream = None
        if self.waiting:
            self.send_ack(conn, self.waiting.popleft())
        else:
            self.free.append(conn)
        self.flush_acks(stream)  # ids handled while this ack was in flight


def client_main(base: str, first: int, step: int, streams: int, acks: bool, out: str) -> None:
    """A stream process: open its streams, say so, collect until told how many pops to expect."""
    raise_nofile(streams * 2 + 1024)
    host, _, port = base.removeprefix("http://").partition(":")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    indexes = list(range(first, streams, step))
    client = Client(host, int(port), indexes, acks, pool=16)
    client.start()
    done = loop.create_future()
    expected = [-1]

    def command() -> None:
        line = os.read(0, 4096).decode().strip()
        expected[0] = int(line) if line else 0

    def check() -> None:
        if client.ready == len(indexes) and not done.done() and not hasattr(client, "said"):
            client.said = True  # type: ignore[attr-defined]
            print(json.dumps({"ready": client.ready}), flush=True)
        if expected[0] >= 0:
            deadline = getattr(client, "deadline", None) or time.monotonic() + 10
            client.deadline = deadline  # type: ignore[attr-defined]
            if len(client.seen) >= expected[0] or time.monotonic() > deadline:
                if not done.done():
                    loop.call_later(0.3, done.set_result, None)  # the last acks
                return
        loop.call_later(0.05, check)

    loop.add_reader(0, command)
    check()
    loop.run_until_complete(done)
    with open(out + ".lat", "wb") as handle:
        client.lats.tofile(handle)
    with open(out + ".cli", "wb") as handle:
        client.client_part.tofile(handle)
    print(
        json.dumps(
            {
                "received": len(client.seen),
                "duplicated": client.duplicates,
                "acks_sent": client.acks_sent,
                "acks_failed": client.acks_failed,
                "pings": client.pings,
            }
        ),
        flush=True,
    )


def status_of(base: str) -> dict[str, Any]:
    host, _, port = base.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            f"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return orjson.loads(data.partition(b"\r\n\r\n")[2])


def main(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile(args.streams * 4 + 1024)
    with tempfile.TemporaryDirectory(prefix="spop-bench-") as scratch:
        work = Path(scratch)
        probe = work / "probe.json" if args.probe else None
        hub, http_port = start_hub(work, not args.no_journal, probe)
        base = f"http://127.0.0.1:{http_port}"
        clients: list[subprocess.Popen[bytes]] = []
        try:
            time.sleep(0.5)
            rss_before = rss_of(hub.pid)
            t0 = time.monotonic()
            for k in range(args.clients):
                cmd = [sys.executable, __file__, "--client", base, "--streams", str(args.streams)]
                cmd += [
                    "--first",
                    str(k),
                    "--step",
                    str(args.clients),
                    "--out",
                    str(work / f"c{k}"),
                ]
                cmd += ["--no-ack"] if args.no_ack else []
                clients.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            for client in clients:
                assert client.stdout is not None
                line = client.stdout.readline()
                if not line:
                    raise SystemExit("a stream process failed")
            opened = time.monotonic() - t0
            time.sleep(1.0)
            rss_open = rss_of(hub.pid)
            env = {**os.environ, "BENCH_STREAMS": str(args.streams)}
            hub_cpu0, wall0 = cpu_of(hub.pid), time.monotonic()
            clients_cpu0 = sum(cpu_of(c.pid) for c in clients)
            spy = None
            if args.profile:  # py-spy (pip install py-spy) samples the hub during the load
                spy = subprocess.Popen(
                    ["py-spy", "record", "--pid", str(hub.pid), "--duration"]
                    + [str(int(args.duration)), "--rate", "200", "--format", "raw"]
                    + ["--output", args.profile, "--nonblocking"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            poster = subprocess.run(
                [sys.executable, __file__, "--source", base, "--rate", str(args.rate)]
                + ["--duration", str(args.duration)],
                stdout=subprocess.PIPE,
                env=env,
                check=True,
            )
            posted = json.loads(poster.stdout.decode().strip().splitlines()[-1])
            total = posted["sent"]
            for k, client in enumerate(clients):
                mine = len(range(k, args.streams, args.clients))
                share = sum(1 for seq in range(total) if (seq % args.streams) % args.clients == k)
                assert client.stdin is not None and mine
                client.stdin.write(f"{share}\n".encode())
                client.stdin.flush()
            reports = []
            for client in clients:
                assert client.stdout is not None
                reports.append(json.loads(client.stdout.readline()))
            wall = time.monotonic() - wall0
            hub_cpu = cpu_of(hub.pid) - hub_cpu0
            clients_cpu = sum(cpu_of(c.pid) for c in clients) - clients_cpu0
            rss_after = rss_of(hub.pid)
            status = status_of(base)
            lats, client_part = array("q"), array("q")
            for k in range(args.clients):
                for name, into in ((".lat", lats), (".cli", client_part)):
                    path = work / f"c{k}{name}"
                    into.frombytes(path.read_bytes())
            for client in clients:
                client.wait(10)
            if spy is not None:
                spy.wait(30)
                hottest(args.profile)
        finally:
            for client in clients:
                if client.poll() is None:
                    client.kill()
            hub.terminate()
            hub.wait(10)
        probed = json.loads(probe.read_text()) if probe is not None and probe.exists() else None
    hub_part = array("q", (lat - cli for lat, cli in zip(lats, client_part, strict=True)))
    received = sum(r["received"] for r in reports)
    from_post, client_pc, hub_pc = (
        percentiles(lats),
        percentiles(client_part),
        percentiles(hub_part),
    )
    result: dict[str, Any] = {
        "streams": args.streams,
        "rate": args.rate,
        "duration_s": args.duration,
        "journal": not args.no_journal,
        "acks": not args.no_ack,
        "stream_processes": args.clients,
        "streams_opened_in_s": round(opened, 2),
        "pops_sent": total,
        "pops_refused": posted["refused"],
        "received_unique": received,
        "lost": total - received,
        "duplicated": sum(r["duplicated"] for r in reports),
        "ack_posts": sum(r["acks_sent"] for r in reports),
        "acks_failed": sum(r["acks_failed"] for r in reports),
        "pending_at_end": status["pending"],
        "from_post_p50_ms": from_post["p50_ms"],
        "from_post_p99_ms": from_post["p99_ms"],
        "from_post_max_ms": from_post["max_ms"],
        "client_part_p50_ms": client_pc["p50_ms"],
        "client_part_p99_ms": client_pc["p99_ms"],
        "hub_part_p50_ms": hub_pc["p50_ms"],
        "hub_part_p99_ms": hub_pc["p99_ms"],
        "hub_cpu_percent": round(100 * hub_cpu / wall, 1),
        # what one pop costs the hub (its POST, its event, its ack POST): steady whatever else
        # runs on the machine, unlike the latency
        "hub_cpu_ms_per_pop": round(1000 * hub_cpu / max(total, 1), 3),
        "stream_processes_cpu_percent": round(100 * clients_cpu / wall, 1),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "hub_rss_mb_before": round(rss_before / 2**20, 1),
        "hub_rss_mb_streams_open": round(rss_open / 2**20, 1),
        "hub_rss_mb_after_load": round(rss_after / 2**20, 1),
        "hub_kb_per_stream": round((rss_open - rss_before) / 1024 / args.streams, 1),
        "hub_kb_per_stream_after_load": round((rss_after - rss_before) / 1024 / args.streams, 1),
    }
    if probed is not None:
        result["hub_loop_stalls_over_2ms"] = probed["stalls_over_2ms"]
        result["hub_loop_stalls_over_10ms"] = probed["stalls_over_10ms"]
        result["hub_worst_stalls_ms"] = probed["worst_stalls_ms"][:5]
        result["hub_worst_stalls_cpu_ms"] = probed["worst_stalls_cpu_ms"][:5]
        result["hub_gc"] = {
            g: (v["count"], v["total_ms"], v["max_ms"]) for g, v in probed["gc"].items()
        }
        result["hub_commits_over_2ms"] = probed["commits_over_2ms"]
        result["hub_commits_over_2ms_on_loop"] = probed["on_loop_commits_over_2ms"]
        result["hub_worst_commits_ms_cpu_onloop"] = probed["worst_commits_ms_cpu_onloop"][:5]
        result["hub_worst_commits_off_loop"] = probed["worst_commits_off_loop"][:5]
        result["hub_stall_times"] = probed["stall_times"][:40]
        result["hub_slow_commit_times"] = probed["commit_times"][:40]
    return result


def ack_cost(count: int) -> dict[str, Any]:
    """The hub's CPU per request, one at a time on one keep-alive connection: `GET /v1/health`
    (the floor of any request the HTTP front answers) and `POST /v1/browser/ack` (one id, unknown: the handler's
    whole path but no pop to settle), alternated twice."""

    def exchange(sock: socket.socket, data: bytes) -> bytes:
        sock.sendall(data)
        buf = b""
        while True:
            buf += sock.recv(65536)
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                length = int(buf[:end].lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(buf) >= end + 4 + length:
                    return buf

    with tempfile.TemporaryDirectory(prefix="spop-bench-") as scratch:
        hub, port = start_hub(Path(scratch), False, None)
        try:
            time.sleep(0.5)
            with socket.create_connection(("127.0.0.1", port)) as sock:
                body = orjson.dumps({"token": TOKEN})
                answer = exchange(sock, request("POST", "/v1/browser/session", {}, body))
                cookie = answer.split(b"spop_session=")[1].split(b";")[0].decode()
                csrf = orjson.loads(answer.partition(b"\r\n\r\n")[2])["csrf"]
                health = b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                ack = request(
                    "POST",
                    "/v1/browser/ack",
                    {"Cookie": f"spop_session={cookie}", "X-Spop-CSRF": csrf},
                    orjson.dumps({"media": MEDIA, "resource": [resource_of(1)], "ids": ["x-1"]}),
                )
                result: dict[str, Any] = {"health_us": [], "ack_us": []}
                for name, data in (("health", health), ("ack", ack)) * 2:
                    for _ in range(200):  # warm-up
                        exchange(sock, data)
                    cpu0 = cpu_of(hub.pid)
                    for _ in range(count):
                        exchange(sock, data)
                    result[f"{name}_us"].append(round((cpu_of(hub.pid) - cpu0) / count * 1e6))
        finally:
            hub.terminate()
            hub.wait(10)
    return result


def hottest(path: str, count: int = 25) -> None:
    """The functions the hub spent most samples in (inclusive), from py-spy's raw output."""
    from collections import Counter

    inclusive: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        n = int(samples)
        total += n
        for frame in set(stack.split(";")):
            inclusive[frame] += n
    print(f"hub profile: {total} samples, inclusive share", file=sys.stderr)
    for frame, n in inclusive.most_common(count):
        print(f"  {100 * n / total:5.1f}%  {frame[:150]}", file=sys.stderr)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=1000, help="pops per second offered")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--no-journal", action="store_true")
    parser.add_argument(
        "--no-ack", action="store_true", help="streams do not ack (pops stay pending)"
    )
    parser.add_argument("--profile", metavar="FILE", help="py-spy the hub during the load")
    parser.add_argument("--probe", action="store_true", help="hub under _hub_probe.py: stalls, GC")
    parser.add_argument("--clients", type=int, default=1, help="stream processes")
    parser.add_argument(
        "--ack-cost", type=int, metavar="N", help="only: hub CPU per health and per ack request"
    )
    parser.add_argument("--source", metavar="BASE", help=argparse.SUPPRESS)  # the poster process
    parser.add_argument("--client", metavar="BASE", help=argparse.SUPPRESS)  # a stream process
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--step", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.source:
        asyncio.run(source(args.source, args.rate, args.duration, f"r{os.getpid()}"))
        return
    if args.ack_cost:
        print(json.dumps(ack_cost(args.ack_cost)))
        return
    if args.client:
        client_main(args.client, args.first, args.step, args.streams, not args.no_ack, args.out)
        return
    result = main(args)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    cli()
