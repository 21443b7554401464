"""Run `spop serve` with two probes, for diagnosing latency stalls (fanout.py --probe).

    python benchmarks/_hub_probe.py OUT.json serve --port 0 …

- garbage-collector pauses (gc.callbacks): count and duration per generation, the longest ones;
- event-loop stalls: a task sleeping 1 ms records every wake-up later than 2 ms.

Experiments (environment variables, for what-if figures; the hub's code is not changed):
SPOP_PROBE_FREEZE=1 (gc.freeze() once the hub has started), SPOP_PROBE_GC_THRESHOLD=a,b,c
(gc.set_threshold), SPOP_PROBE_MANUAL_GC=1 (time a full collection every 2 s).

The hub itself is unchanged (the probe task only runs beside it); on exit the figures go to OUT.json.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import os
import sys
import time

OUT = sys.argv.pop(1)
gc_stats: dict[int, list[float]] = {0: [], 1: [], 2: []}
stalls: list[tuple[float, float]] = []  # (monotonic, ms late)
stall_cpu: list[tuple[float, float]] = []  # (ms late, CPU ms of the loop thread meanwhile)
_gc_start = [0.0]
_gc_cpu = [0.0]
gc_cpu = {0: 0.0, 1: 0.0, 2: 0.0}
gc_collected = {
    0: 0,
    1: 0,
    2: 0,
}  # unreachable objects freed (cyclic garbage)  # CPU ms of the collecting thread (wall minus preemption)
census: list[dict] = []  # what the heap holds at the first long gen-2 collections


def on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
        _gc_cpu[0] = time.thread_time()
    else:
        gen = info["generation"]
        gc_stats[gen].append((time.perf_counter() - _gc_start[0]) * 1000)
        gc_cpu[gen] += (time.thread_time() - _gc_cpu[0]) * 1000
        gc_collected[gen] += info.get("collected", 0)
        if gen == 2 and len(census) < 3 and gc_stats[2][-1] > 10:
            from collections import Counter

            objects = gc.get_objects()
            top = Counter(type(o).__qualname__ for o in objects).most_common(8)
            sized = []
            for o in objects:
                try:
                    sized.append((len(o), type(o).__qualname__))  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 - unsized
                    pass
            big = sorted(sized, reverse=True)[:5]
            gc.callbacks.remove(on_gc)
            t0 = time.perf_counter()
            gc.collect(2)
            again = (time.perf_counter() - t0) * 1000
            gc.callbacks.append(on_gc)
            big.append(("again_ms", round(again, 1)))
            census.append(
                {
                    "ms": round(gc_stats[2][-1], 1),
                    "collected": info.get("collected"),
                    "tracked": len(objects),
                    "top": top,
                    "big": big,
                }
            )
            del objects


gc.callbacks.append(on_gc)


manual: list[tuple[float, int]] = []  # (ms, tracked) of explicit gc.collect() every 2 s


async def manual_gc() -> None:
    while True:
        await asyncio.sleep(2)
        gc.callbacks.remove(on_gc)
        t0 = time.perf_counter()
        gc.collect()
        manual.append((round((time.perf_counter() - t0) * 1000, 2), len(gc.get_objects())))
        gc.callbacks.append(on_gc)


async def watch_loop() -> None:
    while True:
        t0, c0 = time.monotonic(), time.thread_time()
        await asyncio.sleep(0.001)
        late = (time.monotonic() - t0 - 0.001) * 1000
        if late > 2:
            stalls.append((time.monotonic(), round(late, 2)))
            # CPU the loop's thread used meanwhile: far below `late`, the process was waiting
            # (descheduled on a busy machine, or blocked in a system call), not computing
            stall_cpu.append((round(late, 2), round((time.thread_time() - c0) * 1000, 2)))


def dump() -> None:
    out = {
        "gc": {
            str(gen): {
                "count": len(ms),
                "total_ms": round(sum(ms), 1),
                "cpu_ms": round(gc_cpu[gen], 1),
                "collected": gc_collected[gen],
                "max_ms": round(max(ms), 2) if ms else 0,
                "over_5ms": sum(1 for m in ms if m > 5),
            }
            for gen, ms in gc_stats.items()
        },
        "gen2_census": census,
        "manual_full_gc": manual,
        "stalls_over_2ms": len(stalls),
        "stalls_over_10ms": sum(1 for _, ms in stalls if ms > 10),
        "worst_stalls_ms": sorted((ms for _, ms in stalls), reverse=True)[:10],
        "worst_stalls_cpu_ms": sorted(stall_cpu, reverse=True)[:10],
        "commits_over_2ms": len(slow_commits),
        "on_loop_commits_over_2ms": sum(1 for c in slow_commits if c[2]),
        "worst_commits_ms_cpu_onloop": sorted(
            slow_commits, key=lambda c: (c[2], c[0]), reverse=True
        )[:10],
        "commit_seconds": commit_seconds,
        "stall_times": [(round(t, 3), ms) for t, ms in stalls if ms > 10][:2000],
        "worst_commits_off_loop": sorted((c for c in slow_commits if not c[2]), reverse=True)[:10],
        "commit_times": [(round(t, 3), ms, on) for t, ms, on in commit_times][:200],
    }
    with open(OUT, "w") as handle:
        json.dump(out, handle)


atexit.register(dump)

from spop_cli.hub import server as _server  # noqa: E402

_start = _server.Hub.start


async def start(self: _server.Hub) -> None:
    await _start(self)
    self._tasks.append(asyncio.get_running_loop().create_task(watch_loop()))
    if os.environ.get(
        "SPOP_PROBE_FREEZE"
    ):  # experiment: what gc.freeze() after start-up would give
        gc.collect()
        gc.freeze()
    if os.environ.get("SPOP_PROBE_GC_THRESHOLD"):  # experiment, e.g. "50000,20,100"
        gc.set_threshold(*(int(x) for x in os.environ["SPOP_PROBE_GC_THRESHOLD"].split(",")))
    if os.environ.get("SPOP_PROBE_MANUAL_GC"):
        self._tasks.append(asyncio.get_running_loop().create_task(manual_gc()))


_server.Hub.start = start  # type: ignore[method-assign]

from spop_cli.hub import journal as _journal  # noqa: E402

_commit = _journal.Journal._commit
slow_commits: list[tuple[float, float, bool]] = []  # (wall ms, CPU ms, on the loop's thread)
commit_seconds: dict[int, list[float]] = {}  # monotonic second -> [commits, wall ms, max ms]
commit_times: list[tuple[float, float, bool]] = []  # (monotonic, wall ms, on the loop) over 10 ms


def timed_commit(self: _journal.Journal, *args: object, **kwargs: object) -> None:
    import threading

    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        _commit(self, *args, **kwargs)
    finally:
        wall = (time.perf_counter() - t0) * 1000
        second = int(time.monotonic())
        row = commit_seconds.setdefault(second, [0, 0.0, 0.0])
        row[0] += 1
        row[1] = round(row[1] + wall, 2)
        row[2] = round(max(row[2], wall), 2)
        if wall > 10:  # when, to line up with the loop's stalls
            commit_times.append(
                (
                    time.monotonic(),
                    round(wall, 2),
                    threading.current_thread() is threading.main_thread(),
                )
            )
        if wall > 2:
            slow_commits.append(
                (
                    round(wall, 2),
                    round((time.thread_time() - c0) * 1000, 2),
                    threading.current_thread() is threading.main_thread(),
                )
            )


_journal.Journal._commit = timed_commit  # type: ignore[method-assign]

from spop_cli.cli import cli  # noqa: E402

cli(prog_name="spop")
