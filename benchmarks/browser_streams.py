"""1,000 browser streams (SSE, a plain HTTP client: no browser) on one hub at 1,000 pops/s.

    python benchmarks/browser_streams.py                 # 1,000 streams, 1,000 pops/s, 20 s, journal on
    python benchmarks/browser_streams.py --no-journal    # the same with pops in memory only
    python benchmarks/browser_streams.py --streams 100 --rate 500 --duration 5

Three processes share the machine: the hub (`spop serve`, uvloop), this one (every stream, reading
events and acking each one by POST as spop.js does), and a source posting one pop per
`POST /v1/pops` at the offered rate. Each pop carries its send time (CLOCK_MONOTONIC, system-wide
on Linux); the latency is from just before its POST to the moment its event is parsed off the
stream. Memory per stream: the hub's RSS with every stream open, minus before, over the count.
Loopback only, free ports, a scratch directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
from _common import percentiles, raise_nofile, rss_of  # noqa: E402

TOKEN = "bench-listener"
SOURCE = "bench-source"
MEDIA = "telephone"


def resource_of(index: int) -> str:
    return str(100_000 + index)


def start_hub(workdir: Path, journal: bool) -> tuple[subprocess.Popen[bytes], int]:
    ready = workdir / "ready.json"
    cmd = [sys.executable, "-m", "spop_cli", "serve", "--host", "127.0.0.1", "--port", "0"]
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


# -- the streams: this process ----------------------------------------------------------------
class Streams:
    def __init__(self, base: str, count: int) -> None:
        self.base = base
        self.count = count
        self.lats = array("q")
        self.sent_lats = array("q")
        self.seen: set[str] = set()
        self.duplicates = 0
        self.ready = 0
        self.acks_failed = 0
        self.acks = True

    async def open(self) -> None:
        jar = aiohttp.CookieJar(unsafe=True)
        connector = aiohttp.TCPConnector(limit=0)
        self.http = aiohttp.ClientSession(
            self.base, cookie_jar=jar, connector=connector, timeout=aiohttp.ClientTimeout(None)
        )
        async with self.http.post("/v1/browser/session", json={"token": TOKEN}) as answer:
            self.csrf = (await answer.json())["csrf"]
            cookie = answer.cookies["spop_session"].value
        # acks as a page sends them: the cookie and the CSRF header, on keep-alive connections
        self.ack_headers = {"Cookie": f"spop_session={cookie}", "X-Spop-CSRF": self.csrf}
        host, _, port = self.base.removeprefix("http://").partition(":")
        self.pool = Pool(host, int(port), 16)
        await self.pool.start()
        self.tasks = [
            asyncio.get_running_loop().create_task(self.stream(i)) for i in range(self.count)
        ]

    async def stream(self, index: int) -> None:
        resource = resource_of(index)
        query = {"media": MEDIA, "resource": resource}
        async with self.http.get("/v1/browser/stream", params=query) as response:
            assert response.status == 200, response.status
            buffer = b""
            to_ack: list[str] = []
            acking = False

            async def ack() -> None:
                nonlocal acking, to_ack
                acking = True
                while to_ack:
                    ids, to_ack = to_ack, []
                    body = orjson.dumps({"media": MEDIA, "resource": resource, "ids": ids})
                    data = request("POST", "/v1/browser/ack", self.ack_headers, body)
                    try:
                        if await self.pool.send(lambda data=data: data) != 200:
                            self.acks_failed += 1
                    except (OSError, asyncio.IncompleteReadError):
                        self.acks_failed += 1
                acking = False

            while True:
                chunk = await response.content.readany()
                if not chunk:
                    return
                now = time.monotonic_ns()
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if event.startswith(b"retry:"):
                        self.ready += 1
                        continue
                    if not event.startswith(b"event: pop\n"):
                        continue
                    data = event[event.index(b"data: ") + 6 :]
                    pop = orjson.loads(data)
                    if pop["id"] in self.seen:
                        self.duplicates += 1
                    else:
                        self.seen.add(pop["id"])
                        self.lats.append(now - int(pop["contact_data"]["t"]))
                        self.sent_lats.append(now - int(pop["contact_data"]["s"]))
                    to_ack.append(pop["id"])
                if to_ack and not acking and self.acks:
                    asyncio.get_running_loop().create_task(ack())

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.pool.close()
        await self.http.close()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile(args.streams * 4 + 1024)
    with tempfile.TemporaryDirectory(prefix="spop-bench-") as scratch:
        hub, http_port = start_hub(Path(scratch), not args.no_journal)
        base = f"http://127.0.0.1:{http_port}"
        try:
            await asyncio.sleep(0.5)
            rss_before = rss_of(hub.pid)
            streams = Streams(base, args.streams)
            streams.acks = not args.no_ack
            t0 = time.monotonic()
            await streams.open()
            while streams.ready < args.streams:
                if time.monotonic() - t0 > 60:
                    raise SystemExit(f"only {streams.ready} of {args.streams} streams opened")
                await asyncio.sleep(0.05)
            opened = time.monotonic() - t0
            await asyncio.sleep(1.0)
            rss_open = rss_of(hub.pid)
            env = {**os.environ, "BENCH_STREAMS": str(args.streams)}
            hub_cpu0, own_cpu0, wall0 = cpu_of(hub.pid), own_cpu(), time.monotonic()
            spy = None
            if args.profile:  # py-spy (pip install py-spy) samples the hub during the load
                spy = subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--pid",
                        str(hub.pid),
                        "--duration",
                        str(int(args.duration)),
                        "--rate",
                        "200",
                        "--format",
                        "raw",
                        "--output",
                        args.profile,
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            poster = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--source",
                base,
                "--rate",
                str(args.rate),
                "--duration",
                str(args.duration),
                stdout=asyncio.subprocess.PIPE,
                env=env,
            )
            out, _ = await poster.communicate()
            posted = json.loads(out.decode().strip().splitlines()[-1])
            total = posted["sent"]
            deadline = time.monotonic() + 10
            while len(streams.seen) < total and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            rss_after = rss_of(hub.pid)
            wall = time.monotonic() - wall0
            hub_cpu, streams_cpu = cpu_of(hub.pid) - hub_cpu0, own_cpu() - own_cpu0
            status_req = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
            async with status_req, status_req.get(f"{base}/v1/status") as answer:
                status = await answer.json()
            await streams.close()
            if spy is not None:
                spy.wait(30)
                hottest(args.profile)
        finally:
            hub.terminate()
            hub.wait(10)
    from_post = percentiles(streams.sent_lats)
    from_intended = percentiles(streams.lats)
    return {
        "streams": args.streams,
        "rate": args.rate,
        "duration_s": args.duration,
        "journal": not args.no_journal,
        "acks": not args.no_ack,
        "streams_opened_in_s": round(opened, 2),
        "pops_sent": total,
        "pops_refused": posted["refused"],
        "received_unique": len(streams.seen),
        "lost": total - len(streams.seen),
        "duplicated": streams.duplicates,
        "acks_failed": streams.acks_failed,
        "pending_at_end": status["pending"],
        "from_post_p50_ms": from_post["p50_ms"],
        "from_post_p99_ms": from_post["p99_ms"],
        "from_post_max_ms": from_post["max_ms"],
        "from_schedule_p99_ms": from_intended["p99_ms"],
        "hub_cpu_percent": round(100 * hub_cpu / wall, 1),
        # what one pop costs the hub (its POST, its event, its ack POST): steady whatever else
        # runs on the machine, unlike the latency
        "hub_cpu_ms_per_pop": round(1000 * hub_cpu / max(total, 1), 3),
        "streams_process_cpu_percent": round(100 * streams_cpu / wall, 1),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "hub_rss_mb_before": round(rss_before / 2**20, 1),
        "hub_rss_mb_streams_open": round(rss_open / 2**20, 1),
        "hub_rss_mb_after_load": round(rss_after / 2**20, 1),
        "hub_kb_per_stream": round((rss_open - rss_before) / 1024 / args.streams, 1),
        "hub_kb_per_stream_after_load": round((rss_after - rss_before) / 1024 / args.streams, 1),
    }


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
    parser.add_argument("--source", metavar="BASE", help=argparse.SUPPRESS)  # the poster process
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.source:
        asyncio.run(source(args.source, args.rate, args.duration, f"r{os.getpid()}"))
        return
    result = asyncio.run(main(args))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    cli()
