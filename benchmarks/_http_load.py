"""HTTP load for the product-path benchmark: real HTTP/1.1 keep-alive clients on `POST /v1/pops`
and `POST /v1/contacts`, closed or open loop.

    python _http_load.py '{"port": 6001, "mode": "open", "kind": "pop", ...}'

One JSON object on stdout at the end. The client is a lean HTTP/1.1 one on asyncio streams (uvloop
when installed): one request in flight per connection, `Connection: keep-alive`, a `Content-Length`
body, the answer read to its `Content-Length`. A lean client keeps the load's own CPU small on a
2-core machine; every request is still a complete HTTP request the hub parses (its lean front,
hub/fasthttp.py, answers these; aiohttp any other).

Open loop: request *i* is meant to leave at `start + i/rate` on connection `i mod conns`; its pop
carries that intended time (CLOCK_MONOTONIC ns) in `contact_data.t`, so the listener side measures
latency from the intended send, queueing included (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import orjson
from _common import MEDIA, resource_name


def pop_body(run: str, seq: int, n: int, t_intended: int) -> dict[str, Any]:
    """One pop as a source posts it (guide scenario 1's fields), to resource `seq mod n`."""
    return {
        "id": f"{run}-{seq}",
        "media": MEDIA,
        "resource": resource_name(seq % n),
        "source": "12345",
        "destination": "2468",
        "queue_name": "File d'attente des ventes",
        "contact_description": "Ventes",
        "wait_time": 10,
        "contact_data": {"code1": "chaîne1", "t": str(t_intended)},
    }


CONTACT_EVENTS = ("queued", "routed", "answered", "ended")


def contact_body(run: str, seq: int, n: int) -> dict[str, Any]:
    """Event `seq mod 4` of contact `seq // 4`: queued, routed (a pop), answered, ended."""
    contact, step = divmod(seq, 4)
    event: dict[str, Any] = {
        "contact_id": f"{run}-c{contact}",
        "event": CONTACT_EVENTS[step],
        "id": f"{run}-e{seq}",
    }
    if step == 0:
        event.update(
            source="12345",
            destination="2468",
            queue_name="Ventes",
            contact_data={"code1": "chaîne1"},
        )
    elif step in (1, 2):
        event["resource"] = resource_name(contact % n)
    return event


class Client:
    """One keep-alive connection; `post` sends one request and reads its whole answer."""

    def __init__(self, port: int, token: str | None) -> None:
        self.port = port
        self.head = (
            "Host: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
        )
        if token:
            self.head += f"Authorization: Bearer {token}\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self, path: str, body: bytes) -> int:
        assert self.reader is not None and self.writer is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
                break
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def make_body(job: dict[str, Any], seq: int, t_intended: int) -> bytes:
    run, n, kind = job["run"], job["n"], job["kind"]
    if kind == "contact":
        return orjson.dumps(contact_body(run, seq, n))
    batch = job.get("batch", 1)
    if batch == 1:
        return orjson.dumps(pop_body(run, seq, n, t_intended))
    first = seq * batch
    return orjson.dumps([pop_body(run, first + k, n, t_intended) for k in range(batch)])


async def main(job: dict[str, Any]) -> dict[str, Any]:
    path = "/v1/contacts" if job["kind"] == "contact" else "/v1/pops"
    conns = job["conns"]
    clients = [Client(job["port"], job.get("token")) for _ in range(conns)]
    await asyncio.gather(*(c.open() for c in clients))
    statuses: dict[int, int] = {}
    lags: list[int] = []  # ns the request left after its intended time (open loop)
    answer_ns: list[int] = []  # intended send → answer (open loop)
    total = job["requests"]
    rate = job.get("rate")
    cpu0 = os.times()
    start = time.monotonic_ns() + 50_000_000

    async def conn_loop(index: int, client: Client) -> None:
        if job["kind"] == "contact":  # the 4 events of a contact in order, on one connection
            seqs = (s for c in range(index, total // 4, conns) for s in range(4 * c, 4 * c + 4))
        else:
            seqs = iter(range(index, total, conns))
        for seq in seqs:
            if rate:
                intended = start + int(seq * 1e9 / rate)
                delay = intended - time.monotonic_ns()
                if delay > 0:
                    await asyncio.sleep(delay / 1e9)
            else:
                intended = time.monotonic_ns()
            body = make_body(job, seq, intended)
            sent = time.monotonic_ns()
            status = await client.post(path, body)
            statuses[status] = statuses.get(status, 0) + 1
            if rate:
                lags.append(sent - intended)
                answer_ns.append(time.monotonic_ns() - intended)

    if not rate:
        start = time.monotonic_ns()
    await asyncio.gather(*(conn_loop(i, c) for i, c in enumerate(clients)))
    wall = (time.monotonic_ns() - start) / 1e9
    cpu1 = os.times()
    for c in clients:
        c.close()
    answer_ns.sort()
    lags.sort()

    def pct(values: list[int], q: float) -> float | None:
        return (
            round(values[min(len(values) - 1, int(q * len(values)))] / 1e6, 3) if values else None
        )

    return {
        "requests": total,
        "statuses": {str(k): v for k, v in statuses.items()},
        "seconds": round(wall, 3),
        "per_second": round(total / wall) if wall > 0 else None,
        "cpu_seconds": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 4),
        "answer_p50_ms": pct(answer_ns, 0.5),
        "answer_p99_ms": pct(answer_ns, 0.99),
        "max_send_lag_ms": round(lags[-1] / 1e6, 3) if lags else None,
    }


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop comes with spop
        pass
    result = asyncio.run(main(orjson.loads(sys.argv[1])))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
