"""Shared pieces of the benchmark load processes: the payload, percentiles, the control channel.

Every load process is a long-lived subprocess driven over stdin/stdout: the orchestrator writes one
JSON command per line, the worker answers with one JSON object per line. Nothing here imports spop.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import threading
import time
from array import array
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

MEDIA = "telephone"
CREATED_AT = "2026-01-01T00:00:00.000Z"
FIRST_RESOURCE = 100_000  # resources are "100000", "100001", … (extensions)


def resource_name(index: int) -> str:
    return str(FIRST_RESOURCE + index)


def source_pop(pop_id: str, resource_: str, t_intended: int, t_sent: int) -> dict[str, Any]:
    """What a source sends: guide scenario 1's fields plus the intended and the actual send time.

    Both are CLOCK_MONOTONIC nanoseconds (system-wide on Linux, so comparable across processes).
    """
    return {
        "id": pop_id,
        "media": MEDIA,
        "resource": resource_,
        "source": "12345",
        "destination": "2468",
        "queue_name": "File d'attente des ventes",
        "contact_description": "Ventes",
        "wait_time": 10,
        "contact_data": {"code1": "chaîne1", "t": str(t_intended), "s": str(t_sent)},
    }


def wire_pop(pop_id: str, resource_: str, t_intended: int, t_sent: int) -> dict[str, Any]:
    """The pop as the hub delivers it (every field present): the MQTT payload, so sizes match."""
    return {
        "id": pop_id,
        "media": MEDIA,
        "resource": resource_,
        "contact_id": "",
        "created_at": CREATED_AT,
        "source": "12345",
        "destination": "2468",
        "queue_name": "File d'attente des ventes",
        "contact_description": "Ventes",
        "from": "",
        "redirect": "",
        "wait_time": 10,
        "contact_data": {"code1": "chaîne1", "t": str(t_intended), "s": str(t_sent)},
    }


def wire_size() -> int:
    """Bytes of one delivered pop frame (`{"op":"pop","pop":{…}}\\n`) with a typical id."""
    now = time.monotonic_ns()
    pop = wire_pop("r1-123456", resource_name(0), now, now)
    return len(orjson.dumps({"op": "pop", "pop": pop})) + 1


def raise_nofile(want: int = 65_536) -> int:
    """Raise RLIMIT_NOFILE (root may raise the hard limit too); return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (max(want, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, target)), target))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Recorder:
    """Per-run counts by sequence number and latencies (ns), as pops reach the action."""

    __slots__ = ("counts", "lats", "sent_lats", "first", "last", "total", "worst")

    def __init__(self) -> None:
        self.counts = bytearray()
        self.lats = array("q")  # from the intended send time: what the benchmark reports
        self.sent_lats = array("q")  # from the actual send: without the source's own lateness
        self.first = 0
        self.last = 0
        self.total = 0
        self.worst: list[tuple[int, int]] = []  # (latency, arrival) of the slowest few

    def hit(self, seq: int, latency: int, now: int, from_send: int) -> None:
        counts = self.counts
        if seq >= len(counts):
            counts.extend(bytes(max(seq + 1 - len(counts), 4096)))
        if counts[seq] < 255:
            counts[seq] += 1
        if counts[seq] == 1:
            self.lats.append(latency)
            self.sent_lats.append(from_send)
            worst = self.worst
            if len(worst) < 5 or latency > worst[0][0]:
                worst.append((latency, now))
                worst.sort()
                del worst[:-5]
        if not self.total:
            self.first = now
        self.total += 1
        self.last = now

    def unique(self) -> int:
        return len(self.lats)

    def report(self, expected: int | None = None) -> dict[str, Any]:
        counts = self.counts
        unique = len(self.lats)
        out: dict[str, Any] = {
            "received": self.total,
            "unique": unique,
            "duplicated": self.total - unique,
            "first_ns": self.first,
            "last_ns": self.last,
        }
        if expected is not None:
            got = sum(1 for c in counts[:expected] if c)
            out["lost"] = expected - got
        out.update(percentiles(self.lats))
        from_send = percentiles(self.sent_lats)
        out["from_send_p50_ms"], out["from_send_p99_ms"] = from_send["p50_ms"], from_send["p99_ms"]
        # when the slowest pops arrived (s after the first pop) and how late they were (ms)
        out["worst"] = [
            [round((at - self.first) / 1e9, 3), round(lat / 1e6, 2)]
            for lat, at in reversed(self.worst)
        ]
        return out


def percentiles(values: array | list[int]) -> dict[str, float | None]:
    """p50/p99/max in milliseconds of nanosecond samples."""
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "samples": 0}
    ordered = sorted(values)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))] / 1e6, 3)

    return {
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] / 1e6, 3),
        "samples": n,
    }


def split_id(pop_id: str) -> tuple[str, int]:
    run, _, seq = pop_id.rpartition("-")
    return run, int(seq)


def run_fast(main: Coroutine[Any, Any, Any]) -> Any:
    """Run a load process's coroutine on uvloop, as `spop` runs (asyncio where uvloop is
    missing). The import alone is tried: an ImportError inside the run is the run's own."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - uvloop comes with spop
        return asyncio.run(main)
    return uvloop.run(main)


def answer(obj: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
    sys.stdout.buffer.flush()


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wait_count(
    cond: threading.Condition, count: Callable[[], int], target: int, timeout: float
) -> bool:
    """Wait on `cond` until count() reaches target; False when timeout passes first."""
    deadline = time.monotonic() + timeout
    with cond:
        while count() < target:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            cond.wait(left)
    return True


def load_args(roles: list[str]) -> Any:
    """The command line every load process takes: its role, the server, how many and on how many
    connections; raises the open-file limit for them."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=roles)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--conns", type=int, default=1)
    # several hubs of a cluster (benchmarks/cluster.py): listener connection i goes to port i % n
    parser.add_argument("--ports", default="")
    args = parser.parse_args()
    raise_nofile()
    return args


def callgrind_total(stderr: str) -> int:
    """The instruction count valgrind's callgrind prints at the end ("Collected : N")."""
    import re

    found = re.search(r"Collected : (\d+)", stderr)
    if found is None:
        raise SystemExit(f"no instruction count from valgrind:\n{stderr[-2000:]}")
    return int(found.group(1))


def callgrind_child(script: str, src: str | None, *args: str) -> int:
    """Run `script --child ARGS` under callgrind (with `src` first on the path: another tree
    for a before/after) and return the instructions it executed."""
    import subprocess
    import tempfile

    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
             sys.executable, script, "--child", *args],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"valgrind run failed:\n{out.stderr[-2000:]}")
    return callgrind_total(out.stderr)
