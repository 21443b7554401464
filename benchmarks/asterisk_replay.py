"""The Asterisk source under a busy PBX's load: the recorded AMI stream (shared/fixtures/asterisk)
relabelled as 1,000 concurrent copies of each of its six calls.

1. events/s: the AMI parser and the call mapping on one core (bytes in, lifecycle events out).
2. end to end: a fake AMI server writes the stream at a steady rate to a real `spop serve` whose
   configuration runs the `asterisk` source inside it; listeners on the agents' resources get the
   pops. Latency = pop received - the AMI event that caused it was written (same process, one clock).

    python benchmarks/asterisk_replay.py [--calls 1000] [--rate 5000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fake_ami import FakeAsterisk, scenarios, transcript_blocks, wave  # noqa: E402
from spop_cli.client import fetch_status_async  # noqa: E402
from spop_cli.listener.core import AsyncListener  # noqa: E402
from spop_cli.sources.ami_parser import AmiParser  # noqa: E402
from spop_cli.sources.asterisk_map import AsteriskMapper, MapConfig  # noqa: E402

SETTLE = 10.0  # seconds from the start of the measured run after which the "after" figures count
POP_EVENTS = {"routed", "consulted", "transferred", "redirected", "picked_up", "recalled"}


# -- 1. parser + mapping on one core -------------------------------------------------------------
def bench_mapping(blocks: list[bytes], calls: int) -> dict[str, Any]:
    parser = AmiParser()
    parser.banner = ""
    mapper = AsteriskMapper(MapConfig())
    events = lifecycle = 0
    seconds = 0.0
    at = datetime(2026, 1, 1, tzinfo=UTC)
    step = timedelta(microseconds=100)
    for scenario in scenarios(blocks):
        data = b"".join(wave(scenario, calls))
        chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
        gc.collect()
        start = time.perf_counter()
        for chunk in chunks:
            for event in parser.feed(chunk):
                at += step
                lifecycle += len(mapper.feed(event, at))
                events += 1
        seconds += time.perf_counter() - start
    parse_only = AmiParser()
    parse_only.banner = ""
    data = b"".join(wave(scenarios(blocks)[0], calls))
    start = time.perf_counter()
    parsed = sum(len(parse_only.feed(data[i : i + 65536])) for i in range(0, len(data), 65536))
    parse_seconds = time.perf_counter() - start
    return {
        "ami_events": events,
        "lifecycle_events": lifecycle,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds),
        "parser_only_events_per_s": round(parsed / parse_seconds),
        "calls_left": len(mapper.calls),
    }


# -- 2. end to end ---------------------------------------------------------------------------------
def causes(
    stream: list[bytes], counted: list[int] | None = None
) -> dict[tuple[str, str], deque[int]]:
    """Which block of the stream causes each pop: (contact, resource) -> block indexes in order.
    `counted` gets the number of lifecycle events the stream maps to."""
    mapper = AsteriskMapper(MapConfig())
    parser = AmiParser()
    parser.banner = ""
    found: dict[tuple[str, str], deque[int]] = defaultdict(deque)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    lifecycle = 0
    for index, block in enumerate(stream):
        for event in parser.feed(block):
            for out in mapper.feed(event, at):
                lifecycle += 1
                if out["event"] in POP_EVENTS:
                    found[(out["contact_id"], out["resource"])].append(index)
    if counted is not None:
        counted.append(lifecycle)
    return found


async def end_to_end(
    blocks: list[bytes], calls: int, rate: int, hub_port: int, tmp: Path
) -> dict[str, Any]:
    debug_emitted: list[Any] = []
    ami = FakeAsterisk()
    await ami.start()
    config = tmp / "spop.toml"
    config.write_text(
        f'[sources.pbx]\ntype = "asterisk"\nport = {ami.port}\n',
        encoding="utf-8",
    )
    env = {**os.environ, "SPOP_ASTERISK_SECRET": "spop-secret", "SPOP_DIAG_DIR": str(tmp / "diag")}
    http_port = hub_port + 1
    inprocess = os.environ.get("BENCH_INPROCESS")
    if inprocess:
        import logging

        from spop_cli.hub.server import Hub, HubConfig
        from spop_cli.sources import HubSink, SourceContext
        from spop_cli.sources.asterisk import AsteriskSource

        hub_obj = Hub(HubConfig(port=hub_port, http_port=None, journal=str(tmp / "journal.db")))
        await hub_obj.start()
        os.environ["SPOP_ASTERISK_SECRET"] = "spop-secret"
        source_obj = AsteriskSource({"port": ami.port})
        source_ctx = SourceContext(HubSink(hub_obj), logging.getLogger("bench"), "pbx")
        source_task = asyncio.get_running_loop().create_task(source_obj.run(source_ctx))
        emitted: dict[tuple[str, str], float] = {}
        feed0 = source_obj.mapper.feed

        def feed(event: Any, at: Any) -> Any:
            out = feed0(event, at)
            for e in out:
                if e["event"] == "routed":
                    emitted.setdefault((e["contact_id"], e["resource"]), time.perf_counter())
            return out

        source_obj.mapper.feed = feed  # type: ignore[method-assign]
        debug_emitted.append(emitted)
    hub = subprocess.Popen(["true"]) if inprocess else subprocess.Popen(
        [sys.executable, *([str(ROOT / "benchmarks" / "_hub_probe.py"), str(tmp / "probe.json")] if os.environ.get("BENCH_PROBE") else ["-m", "spop_cli"]), "serve", "--config", str(config), "--port", str(hub_port),
         "--http-port", str(http_port), *(["--no-journal"] if os.environ.get("BENCH_NO_JOURNAL") else ["--journal", str(tmp / "journal.db")])],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp / "hub.log").open("wb"),
    )  # fmt: skip
    received: list[float] = []
    latencies: list[float] = []
    timed: list[tuple[float, float]] = []  # (cause written at, latency ms)
    written: dict[int, float] = {}
    stream: list[bytes] = []
    for scenario in scenarios(blocks):
        stream.extend(wave(scenario, calls))
    counted: list[int] = []
    expected = causes(stream, counted)
    total = sum(len(v) for v in expected.values())
    unexplained = 0
    slow: list[Any] = []

    listener_hook: list[list[Any]] = []
    measured_at: list[float] = []

    def on_pop(event: Any) -> None:
        nonlocal unexplained
        now = time.perf_counter()
        if listener_hook:
            listener_hook[0].append(event)
            return
        queue = expected.get((event.contact_id, event.resource))
        if not queue:
            unexplained += 1
            return
        index = queue.popleft()
        received.append(now)
        latencies.append((now - written[index]) * 1000)
        timed.append((written[index], (now - written[index]) * 1000))
        if os.environ.get("BENCH_DEBUG"):
            created = datetime.fromisoformat(event.created_at.replace("Z", "+00:00")).timestamp()
            lag = round((time.time() - created) * 1000, 1)  # after the source read the event
            slow.append(((now - written[index]) * 1000, index, stream[index][:40], lag))

    listeners = []
    # the measuring process holds a million blocks: keep its collector off them, or its full
    # collections (100s of ms) would be counted as pop latency
    gc.collect()
    gc.freeze()
    try:
        session = await ami.session(timeout=30)
        for resource in sorted({resource for _, resource in expected}):
            listener = AsyncListener("telephone", reconnecting_interval=0.3)
            listener.on_screen_pop(on_pop)
            await listener.initialize(f"{hub_port}@127.0.0.1")
            await listener.start_listening(resource)
            listeners.append(listener)
        # warm-up, not measured: a fresh hub's first seconds (lazy imports, the journal's first
        # transactions, 500 registrations settling) are not its steady state
        warm = [b for scenario in scenarios(blocks) for b in wave(scenario, 100, first=calls + 100)]
        warm_pops = sum(len(v) for v in causes(warm).values())
        warmed: list[Any] = []
        listener_hook.append(warmed)
        for i in range(0, len(warm), 50):
            session.writer.write(b"".join(b for b in warm[i : i + 50] if ami.wanted(session, b)))
            await asyncio.sleep(0.01)
        deadline = time.perf_counter() + 30
        while len(warmed) < warm_pops and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        listener_hook.clear()
        await asyncio.sleep(1.0)
        lags: list[float] = []
        start = time.perf_counter()
        big_lags: list[Any] = []
        gc_log: list[Any] = []
        gc_t = [0.0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                gc_t[0] = time.perf_counter()
            elif time.perf_counter() - gc_t[0] > 0.01:
                gc_log.append(
                    (
                        round(gc_t[0] - start, 2),
                        info["generation"],
                        round((time.perf_counter() - gc_t[0]) * 1000),
                    )
                )

        if os.environ.get("BENCH_DEBUG"):
            gc.callbacks.append(on_gc)

        async def probe() -> None:
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append((time.perf_counter() - t - 0.005) * 1000)
                if lags[-1] > 20:
                    big_lags.append((round(t - start, 2), round(lags[-1])))

        prober = (
            asyncio.get_running_loop().create_task(probe())
            if os.environ.get("BENCH_DEBUG")
            else None
        )
        cpu_series: list[float] = []

        async def cpu_sampler() -> None:
            import psutil

            proc = psutil.Process(hub.pid)
            last = sum(proc.cpu_times()[:2])
            while True:
                await asyncio.sleep(1.0)
                now_cpu = sum(proc.cpu_times()[:2])
                cpu_series.append(round((now_cpu - last) * 100))
                last = now_cpu

        sampler = (
            asyncio.get_running_loop().create_task(cpu_sampler())
            if os.environ.get("BENCH_DEBUG") and not inprocess
            else None
        )
        tick = 0.001
        per_tick = max(1, round(rate * tick))
        # what the hub's filter lets through, chosen before the clock starts: on 1,000 calls this
        # takes seconds, and the first seconds of the stream would then be written in one burst
        chosen = [(i, b) for i, b in enumerate(stream) if ami.wanted(session, b)]
        measured_at.append(time.monotonic())
        full_speed: dict[str, Any] = {}
        if rate <= 0:  # as fast as the socket takes it: how fast the hub gets through the stream
            address = f"{hub_port}@127.0.0.1"
            status = await fetch_status_async(address)
            base = status["counters"].get("contact_events", 0)
            refused_before = hub_refusals(tmp)
        hub_cpu = hub_cpu_seconds(hub.pid) if not inprocess else 0.0
        start = time.perf_counter()
        sent = 0
        if rate <= 0:
            data = b"".join(b for _, b in chosen)
            for index, _ in chosen:
                written[index] = start
            for offset in range(0, len(data), 65536):
                session.writer.write(data[offset : offset + 65536])
                await session.writer.drain()
            sent = len(chosen)
            applied, last_change = 0, time.perf_counter()
            while applied < counted[0] and time.perf_counter() - last_change < 3.0:
                await asyncio.sleep(0.02)
                status = await fetch_status_async(address)
                now_applied = status["counters"].get("contact_events", 0) - base
                if now_applied != applied:
                    applied, last_change = now_applied, time.perf_counter()
            took = last_change - start
            full_speed = {
                "lifecycle_expected": counted[0],
                "lifecycle_applied": applied,
                "full_speed_seconds": round(took, 3),
                "full_speed_ami_events_per_s": round(sent / took),
            }
        for position in range(0, len(chosen) if rate > 0 else 0, per_tick):
            due = start + (position / per_tick) * tick
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            piece = chosen[position : position + per_tick]
            for index, _ in piece:
                written[index] = now
            session.writer.write(b"".join(b for _, b in piece))
            sent += len(piece)
        write_seconds = time.perf_counter() - start
        # at full speed the pops of calls that ended in the same batch are withdrawn, never sent
        deadline = time.perf_counter() + (60 if rate > 0 else 1)
        while len(received) < total and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the last batches' commits and their log lines
        hub_cpu = hub_cpu_seconds(hub.pid) - hub_cpu if not inprocess else 0.0
        refusals = hub_refusals(tmp) - (refused_before if rate <= 0 else 0)
        latencies.sort()
        if sampler is not None:
            sampler.cancel()
            print("hub cpu % per s:", cpu_series, file=sys.stderr)
            print("bench lags > 20 ms (s, ms):", big_lags, "gc > 10 ms:", gc_log, file=sys.stderr)
        if prober is not None:
            prober.cancel()
            print(
                "bench loop lag ms: max",
                round(max(lags), 1),
                "p99",
                round(sorted(lags)[int(len(lags) * 0.99)], 1),
                [round(x) for x in lags[:: max(1, len(lags) // 30)]],
                file=sys.stderr,
            )
        if slow:
            slow.sort(reverse=True)
            for row in slow[:5] + slow[len(slow) // 2 : len(slow) // 2 + 3]:
                print(row, file=sys.stderr)
            from collections import Counter

            byindex = sorted((r[1], r[0], r[3]) for r in slow)
            for k in range(0, len(byindex), len(byindex) // 40):
                print(byindex[k], file=sys.stderr)
            print(
                Counter(r[2].split(b"\r\n")[0] for r in slow if r[0] > 20),
                sorted(r[1] for r in slow if r[0] > 20)[::100],
                file=sys.stderr,
            )

        def pct(p: float) -> float:
            return (
                round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3)
                if latencies
                else -1.0
            )

        later = sorted(lat for at, lat in timed if at - start >= SETTLE)
        return {
            "calls": calls,
            "listeners": len(listeners),
            "offered_rate": rate,
            "ami_events_written": sent,
            "achieved_rate": round(sent / write_seconds),
            "pops_expected": total,
            "pops_received": len(received),
            "unexplained_pops": unexplained,
            # the hub's CPU (AMI parsing, the mapping, the hub) from the first event written
            # until every pop was received, per AMI event written; and the events it refused
            "hub_cpu_s": round(hub_cpu, 3),
            "hub_cpu_us_per_ami_event": round(hub_cpu / sent * 1e6, 2) if sent else -1.0,
            "hub_refusals": refusals,
            **full_speed,
            "latency_ms_p50": pct(0.50),
            "latency_ms_p99": pct(0.99),
            "latency_ms_max": round(latencies[-1], 3) if latencies else -1.0,
            "latency_ms_mean": round(statistics.fmean(latencies), 3) if latencies else -1.0,
            f"after_{SETTLE:.0f}s_pops": len(later),
            f"after_{SETTLE:.0f}s_latency_ms_p50": round(later[len(later) // 2], 3)
            if later
            else -1.0,
            f"after_{SETTLE:.0f}s_latency_ms_p99": round(later[int(0.99 * len(later))], 3)
            if later
            else -1.0,
            f"after_{SETTLE:.0f}s_latency_ms_max": round(later[-1], 3) if later else -1.0,
        }
    finally:
        for listener in listeners:
            await listener.stop_listening()
        if inprocess:
            source_ctx.stop.set()
            await source_task
            await hub_obj.stop()
        hub.terminate()
        try:
            hub.wait(20)
        except subprocess.TimeoutExpired:
            hub.kill()
        await ami.stop()
        if (tmp / "probe.json").exists():
            probe = json.loads((tmp / "probe.json").read_text())
            keep = ("stalls_over_2ms", "stalls_over_10ms", "worst_stalls_ms", "worst_stalls_cpu_ms")
            keep += ("commits_over_2ms", "on_loop_commits_over_2ms", "worst_commits_ms_cpu_onloop")
            print("hub probe:", {k: probe.get(k) for k in keep}, file=sys.stderr)
            print("hub gc:", probe.get("gc"), file=sys.stderr)
            base = int(measured_at[0]) if measured_at else 0
            print(
                "commits per second of the measured run [n, wall ms, max ms]:",
                {
                    int(k) - base: v
                    for k, v in probe.get("commit_seconds", {}).items()
                    if int(k) >= base - 2
                },
                "stalls > 10 ms (s, ms):",
                [
                    (round(t - base, 1), ms)
                    for t, ms in probe.get("stall_times", [])
                    if t >= base - 2
                ],
                file=sys.stderr,
            )
        log = tmp / "hub.log"
        if os.environ.get("BENCH_DEBUG") and log.exists():
            lines = log.read_text(errors="replace").splitlines()
            print(f"hub log: {len(lines)} lines; last:", *lines[-15:], sep="\n  ", file=sys.stderr)


def hub_refusals(tmp: Path) -> int:
    """Events the hub refused the source (its log lines: stderr and the diagnostics files)."""
    files = [tmp / "hub.log", *(tmp / "diag").glob("**/*")]
    return sum(f.read_text(errors="replace").count("hub refused ") for f in files if f.is_file())


def hub_cpu_seconds(pid: int) -> float:
    """User + system CPU of the hub process so far."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def free_port_pair() -> int:
    import socket

    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--calls", type=int, default=1000, help="concurrent copies of each recorded call"
    )
    parser.add_argument(
        "--rate",
        type=int,
        default=2000,
        help="AMI events/s written in the end-to-end run; 0: as fast as the socket takes them",
    )
    parser.add_argument(
        "--e2e-calls", type=int, default=None, help="copies in the end-to-end run (default --calls)"
    )
    parser.add_argument("--no-e2e", action="store_true", help="only the parser + mapping figure")
    parser.add_argument("--no-mapping", action="store_true", help="only the end-to-end figure")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    blocks = transcript_blocks()
    results: dict[str, Any] = {}
    if not args.no_mapping:
        results["mapping"] = bench_mapping(blocks, args.calls)
        print(f"parser + mapping, one core: {results['mapping']}", file=sys.stderr)
    if not args.no_e2e:
        import uvloop

        with tempfile.TemporaryDirectory() as tmp:
            e2e = end_to_end(
                blocks, args.e2e_calls or args.calls, args.rate, free_port_pair(), Path(tmp)
            )
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                results["end_to_end"] = runner.run(e2e)
        print(f"end to end: {results['end_to_end']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
