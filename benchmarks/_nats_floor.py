"""NATS alone, without spop: the floor under the three-hub latency of benchmarks/cluster.py.

    python benchmarks/_nats_floor.py --servers nats://127.0.0.1:P1,… --n 1000

One process on uvloop: a publisher and three readers, each on its own connection, as the three
hubs' would be. The publisher writes each pop to a stream made like the hubs' (replicas 3, file
storage, the same max_age, duplicate window and headers), with a reply inbox for JetStream's
answer, at its intended time (open loop). Each reader follows the whole stream with an ordered
consumer, as a hub does, and stamps only the pops of its third of the keys (the pops its
listeners would get); the others it drops. Latency runs from the pop's intended time to the
reader's callback, as spop's runs from the intended time to the listener's.

What this leaves out of spop's path: the source's connection to a hub, the hub's work, the
listener's connection and its ack. So: p99 here over 5 ms means no code in the hubs can meet
the 5 ms target on this host at that moment. It also gives the latency of JetStream's answers to
the publisher (from the pop's intended time to the answer that it is stored): a hub delivers a
pop only after it is stored, so that is a floor too, one that needs no reader at all.

JSON commands on stdin, one JSON answer line each on stdout (as fanout.py's workers):
{"cmd": "open", "run", "rate", "duration", "n"} and {"cmd": "quit"}.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson
from _common import Recorder, answer, resource_name, run_fast, split_id, wire_pop

STREAM = "SPOPFLOOR"
READERS = 3
TTL = 120.0  # s: the hubs' stream max_age and duplicate window at the default pop_ttl


class Floor:
    def __init__(self, servers: list[str], n: int) -> None:
        self.servers, self.n = servers, n
        self.runs: dict[str, Recorder] = {}
        self.stored: dict[str, Recorder] = {}  # JetStream's answers to the publisher, by run
        self.times: dict[str, tuple[int, float]] = {}  # run → (start, period) in ns
        self.oks = 0
        self.errors = 0

    async def start(self) -> None:
        import nats
        from nats.js.api import DeliverPolicy, StorageType, StreamConfig

        self.pub = await nats.connect(self.servers)
        js = self.pub.jetstream()
        await js.add_stream(
            StreamConfig(
                name=STREAM,
                subjects=["spop.pop.>"],
                num_replicas=3 if len(self.servers) >= 3 else 1,
                max_age=TTL,
                duplicate_window=TTL,
                allow_direct=True,
                storage=StorageType.FILE,
            )
        )
        self.inbox = self.pub.new_inbox()
        await self.pub.subscribe(self.inbox + ".>", cb=self._answered)
        self.readers = [await nats.connect(self.servers) for _ in range(READERS)]
        for i, reader in enumerate(self.readers):
            await reader.jetstream().subscribe(
                "spop.pop.>",
                stream=STREAM,
                cb=self._reader(i),
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
                idle_heartbeat=1.0,
            )

    async def _answered(self, msg: Any) -> None:
        now = time.monotonic_ns()
        if msg.headers and msg.headers.get("Status"):
            self.errors += 1
            return
        self.oks += 1
        run, seq = msg.subject.rsplit(".", 2)[1:]
        if run not in self.times:  # an answer later than its run's report: not counted
            return
        start, period = self.times[run]
        intended = start + int(int(seq) * period)
        self.stored[run].hit(int(seq), now - intended, now, 0)

    def _reader(self, index: int) -> Any:
        runs = self.runs

        async def on_pop(msg: Any) -> None:
            now = time.monotonic_ns()
            headers = msg.headers or {}
            if int(headers.get("Spop-Key", "0")) % READERS != index:
                return  # another hub's listener: dropped, as a hub drops it
            run, seq = split_id(headers["Spop-Id"])
            data = orjson.loads(msg.data)["contact_data"]
            rec = runs.get(run)
            if rec is None:
                rec = runs[run] = Recorder()
            rec.hit(seq, now - int(data["t"]), now, now - int(data["s"]))

        return on_pop

    async def open_loop(self, run: str, rate: float, duration: float) -> dict[str, Any]:
        total = max(1, int(rate * duration))
        period = 1e9 / rate
        base = self.oks
        start = time.monotonic_ns() + 2_000_000
        self.times[run] = (start, period)
        stored = self.stored[run] = Recorder()
        i = 0
        while i < total:
            now = time.monotonic_ns()
            intended = start + int(i * period)
            if now < intended:
                await asyncio.sleep((intended - now) / 1e9)
                continue
            due = min(total, int((now - start) / period) + 1)
            for j in range(i, due):
                key = j % self.n
                pop_id = f"{run}-{j}"
                body = orjson.dumps(
                    wire_pop(pop_id, resource_name(key), start + int(j * period), now)
                )
                headers = {
                    "Spop-Id": pop_id,
                    "Spop-Expires": f"{time.time() + TTL:.3f}",
                    "Spop-Key": str(key),
                    "Nats-Msg-Id": pop_id,
                }
                await self.pub.publish(
                    f"spop.pop.telephone.{resource_name(key)}",
                    body,
                    reply=f"{self.inbox}.{run}.{j}",
                    headers=headers,
                )
            i = due
        deadline = time.monotonic() + 10 + duration
        rec = self.runs.setdefault(run, Recorder())
        while (rec.unique() < total or self.oks - base < total) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        drained = rec.unique() >= total
        await asyncio.sleep(0.2)  # a late duplicate would show
        out = rec.report(expected=total)
        out.update(sent=total, oks=self.oks - base, drained=drained, errors=self.errors)
        answers = stored.report()
        out["stored_p50_ms"], out["stored_p99_ms"] = answers["p50_ms"], answers["p99_ms"]
        del self.runs[run], self.stored[run], self.times[run]
        return out


async def serve(args: argparse.Namespace) -> None:
    floor = Floor(args.servers.split(","), args.n)
    await floor.start()
    answer({"ready": True})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = orjson.loads(line)
        if cmd["cmd"] == "open":
            answer(await floor.open_loop(cmd["run"], cmd["rate"], cmd["duration"]))
        elif cmd["cmd"] == "quit":
            break
    answer({"bye": True})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", required=True)
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    run_fast(serve(args))


if __name__ == "__main__":
    main()
