"""The product's own paths: `POST /v1/pops`, `POST /v1/contacts` and the real `spop listen`.

    python benchmarks/product_paths.py [--quick] [--json] [--listeners 1000] [--profile DIR]

`fanout.py` measures the hub with lean protocol clients; users run none of those. Here the sources
are HTTP clients (benchmarks/_http_load.py: keep-alive connections, one request in flight each) and
the desktops are one real `spop listen --config FILE --json` process holding N `[[listeners]]`.
Every figure is CPU per pop (or per request) of each process, from psutil (hub, listener) and the
load's own `os.times()`, so a regression shows as a number; the open-loop run gives the latency
from the intended send to the pop's line on the listener's standard output.

The targets of issue 15 are checked in the summary (met / gap, with the cause found by profiling:
benchmarks/PROFILE.md); nothing here is a timed test. Only 127.0.0.1; everything stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fanout  # noqa: E402
import orjson  # noqa: E402
from _common import raise_nofile, resource_name  # noqa: E402
from fanout import HubProcess, cpu_seconds, spop_command  # noqa: E402

# (key, what, target, unit): checked in `targets`
TARGETS = [
    ("single_hub_us", "one pop per POST /v1/pops (keep-alive, journal on): hub CPU per request", 200, "µs"),
    ("batched_hub_us", "POST /v1/pops with 100 pops, fan-out to N real `spop listen` registrations: hub CPU per pop", 60, "µs"),
    ("listen_us", "`spop listen --config` (N listeners, --json): CPU per pop", 80, "µs"),
    ("open_p99_ms", "N listeners in one `spop listen`, 1,000 single-pop POSTs/s from 16 connections: p99 intended send → stdout line", 5, "ms"),
    ("contacts_hub_us", "POST /v1/contacts, one event per request: hub CPU per event", 250, "µs"),
]  # fmt: skip

# Why a target is missed, from the profiles (benchmarks/PROFILE.md, "Product paths"); shown beside a gap.
CAUSES = {
    "single_hub_us": "per request: the journal commit on the loop (a sixth of the samples), the "
    "HTTP front's parsing and answer (a fifth), the answer's send; the pop frames of one loop "
    "turn share one write to the listeners' shared connection (PROFILE.md, one connection)",
    "batched_hub_us": "per pop: SQLite's insert, done update and purge (a fifth of the samples), "
    "fan-out bookkeeping (publish, accept, the ack settled) and validation; the frames of a turn "
    "share one write and the acks of a read one frame (PROFILE.md, one connection)",
    "listen_us": "per pop: the frame's parse, the pop object, its diagnostics line and its JSON "
    "line; the read, the ack frame and the stdout flush are shared by the pops of one read "
    "(PROFILE.md; listen_instructions.py counts it without noise)",
    "open_p99_ms": "the VM, not a code path found: each pop is alone in its loop turn in four "
    "processes (hub ~300-400 µs, listener ~170 µs, load, this script's reader) on 2 shared "
    "vCPUs; the same code gave p99 2.6-4.8 ms in some runs and 12-44 ms in others at load "
    "average < 1, with 10-40 % steal; gc.freeze() every second in every process did not move "
    "it (PROFILE.md, one connection; RESULTS.md)",
    "contacts_hub_us": "per event: a single-pop POST's work (the request, its answer, 0.75 frames "
    "sent to listeners and 0.75 acks read back, ~2.5 journal rows) plus the contact rules, a tenth "
    "of the samples (PROFILE.md, POST /v1/contacts)",
}


class ListenProcess:
    """`spop listen --config FILE --json` with N [[listeners]]; a thread timestamps each stdout line."""

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str],
        port: int,
        n: int,
        name: str,
        action: dict[str, Any] | None = None,
    ) -> None:
        self.n, self.name = n, name
        self.config = tmp / f"{name}.toml"
        lines = ["[server]", f'address = "{port}@127.0.0.1"', "reconnecting_interval = 2", ""]
        if action is not None:
            lines += ["[actions.hook]", *(f"{k} = {json.dumps(v)}" for k, v in action.items()), ""]
        for i in range(n):
            lines += ["[[listeners]]", 'media = "telephone"', f'resource = "{resource_name(i)}"']
            if action is not None:
                lines.append('actions = ["hook"]')
            lines.append("")
        self.config.write_text("\n".join(lines))
        self.errpath = tmp / f"{name}.err"
        self.proc = subprocess.Popen(
            [*spop_command(), "listen", "--config", str(self.config), "--json"],
            stdout=subprocess.PIPE,
            stderr=open(self.errpath, "wb"),  # noqa: SIM115
            env=env,
        )
        # pop id, intended ns (or 0) and arrival ns of each line, in three lists of atoms: a
        # list of tuples is tracked by the garbage collector, whose full passes over tens of
        # thousands of them, in this process, held up the thread stamping the arrivals (the
        # open loop's p99 grew from run to run of one `--runs 3`)
        self.ids: list[str] = []
        self.intended: list[int] = []
        self.arrived: list[int] = []
        self.lines = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        now = time.monotonic_ns
        ids, intended, arrived = self.ids, self.intended, self.arrived
        for line in self.proc.stdout:
            at = now()
            try:
                pop = orjson.loads(line)
                t = int((pop.get("contact_data") or {}).get("t", 0))
            except (ValueError, TypeError):
                continue
            ids.append(pop["id"])
            intended.append(t)
            arrived.append(at)  # last: a reader takes len(arrived) entries of each list
            self.lines += 1

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_lines(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.lines < count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        return True

    def action_outcomes(self) -> dict[str, int]:
        text = self.errpath.read_text(errors="replace")
        return {
            "ok": text.count("hook: ok") + text.count("hook ok"),
            "failed": text.count("hook: failed") + text.count("hook failed"),
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_registrations(hub: HubProcess, n: int, timeout: float = 120) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if hub.status()["registrations"] >= n:
            return time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError(f"only {hub.status()['registrations']} of {n} listeners registered")


def http_load(port: int, env: dict[str, str], **job: Any) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(HERE / "_http_load.py"), json.dumps({"port": port, **job})],
        capture_output=True,
        env=env,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"_http_load.py failed:\n{out.stderr.decode()[-2000:]}")
    return json.loads(out.stdout)


def _us(seconds: float, count: int) -> float:
    return round(seconds * 1e6 / count, 1) if count else float("nan")


class Phase:
    """CPU of the hub and the listener across one load run (until the listener printed it all)."""

    def __init__(self, hub: HubProcess, listener: ListenProcess | None) -> None:
        self.hub, self.listener = hub, listener
        self.hub0 = cpu_seconds(hub.pid)
        self.lst0 = cpu_seconds(listener.pid) if listener else 0.0
        self.lines0 = listener.lines if listener else 0

    def finish(
        self, load: dict[str, Any], pops: int, per: int, expect_lines: int | None = None
    ) -> dict[str, Any]:
        drained = True
        if self.listener is not None:
            drained = self.listener.wait_lines(
                self.lines0 + (pops if expect_lines is None else expect_lines), 60
            )
            if not drained:  # figures over pops that never arrived would flatter everything
                raise RuntimeError(
                    f"spop listen printed {self.listener.lines - self.lines0} of "
                    f"{pops if expect_lines is None else expect_lines} lines within 60 s"
                )
            time.sleep(0.2)  # the acks of the last lines reach the hub
        if self.listener is not None and self.listener.proc.poll() is not None:
            raise RuntimeError(
                f"spop listen exited {self.listener.proc.returncode}:\n"
                + self.listener.errpath.read_text(errors="replace")[-3000:]
            )
        hub = cpu_seconds(self.hub.pid) - self.hub0
        lst = (cpu_seconds(self.listener.pid) - self.lst0) if self.listener else 0.0
        return {
            "requests": load["requests"],
            "pops": pops,
            "per_second": load["per_second"],
            "statuses": load["statuses"],
            "drained": drained,
            "hub_us": _us(hub, per),
            "hub_us_per_pop": _us(hub, pops),
            "listener_us_per_pop": _us(lst, pops) if self.listener else None,
            "load_us": _us(load["cpu_seconds"], per),
            "answer_p50_ms": load.get("answer_p50_ms"),
            "answer_p99_ms": load.get("answer_p99_ms"),
        }


def latencies(listener: ListenProcess, run: str) -> dict[str, Any]:
    prefix = run + "-"
    seen: set[str] = set()
    lats = []
    dup = 0
    n = len(listener.arrived)
    for pop_id, t, at in zip(
        listener.ids[:n], listener.intended[:n], listener.arrived[:n], strict=True
    ):
        if not pop_id.startswith(prefix):
            continue
        if pop_id in seen:
            dup += 1
            continue
        seen.add(pop_id)
        lats.append(at - t)
    lats.sort()

    def pct(q: float) -> float | None:
        return round(lats[min(len(lats) - 1, int(q * len(lats)))] / 1e6, 3) if lats else None

    return {
        "received": len(lats),
        "duplicated": dup,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "max_ms": round(lats[-1] / 1e6, 3) if lats else None,
    }


def py_spy(pid: int, seconds: float, path: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
         "--nonblocking", "--format", "raw", "--output", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def run(
    tmp: Path,
    env: dict[str, str],
    log: Any,
    *,
    n: int = 1000,
    quick: bool = False,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Every product path on one fresh hub with a real `spop listen` of n listeners."""
    scale = 0.25 if quick else 1.0
    result: dict[str, Any] = {
        "listeners": n,
        "quick": quick,
        "loadavg_at_start": os.getloadavg()[0],
    }
    hub = HubProcess(tmp, env, name="product-hub")
    hub.start()
    listener: ListenProcess | None = None
    try:
        listener = ListenProcess(tmp, env, hub.port, n, "product-listen")
        result["register_seconds"] = round(wait_registrations(hub, n), 2)
        # warm-up: every connection carries a pop once, so nothing is first-time in the figures
        w = http_load(
            hub.http_port, env, run="w", kind="pop", n=n, conns=4, requests=n // 100 or 1, batch=100
        )
        listener.wait_lines(w["requests"] * 100, 60)

        log("  one pop per POST /v1/pops, 16 keep-alive connections, closed loop")
        count = int(5000 * scale)
        phase = Phase(hub, listener)
        spy = py_spy(hub.pid, 4, profile / "hub-single.txt") if profile else None
        load = http_load(hub.http_port, env, run="s", kind="pop", n=n, conns=16, requests=count)
        result["single"] = phase.finish(load, count, count)
        if spy:
            spy.wait()

        log("  100 pops per POST /v1/pops, 4 connections, closed loop")
        reqs = int(300 * scale)
        phase = Phase(hub, listener)
        spies = (
            [
                py_spy(hub.pid, 3, profile / "hub-batched.txt"),
                py_spy(listener.pid, 3, profile / "listen.txt"),
            ]
            if profile
            else []
        )
        load = http_load(
            hub.http_port, env, run="b", kind="pop", n=n, conns=4, requests=reqs, batch=100
        )
        result["batched"] = phase.finish(load, reqs * 100, reqs * 100)
        for spy in spies:
            if spy:
                spy.wait()

        rate, duration = 1000, (2 if quick else 5)
        log(f"  open loop: {rate:,} single-pop POSTs/s for {duration} s from 16 connections")
        phase = Phase(hub, listener)
        spies = (
            [
                py_spy(hub.pid, duration - 1, profile / "hub-open.txt"),
                py_spy(listener.pid, duration - 1, profile / "listen-open.txt"),
            ]
            if profile
            else []
        )
        load = http_load(
            hub.http_port,
            env,
            run="o",
            kind="pop",
            n=n,
            conns=16,
            requests=rate * duration,
            rate=rate,
        )
        result["open"] = phase.finish(load, rate * duration, rate * duration)
        for spy in spies:
            if spy:
                spy.wait()
        result["open"].update(latencies(listener, "o"), rate=rate, duration=duration)

        log(
            "  POST /v1/contacts, one event per request (queued, routed, answered, ended), 16 connections"
        )
        events = int(4000 * scale)
        phase = Phase(hub, listener)
        spy = py_spy(hub.pid, 2, profile / "hub-contacts.txt") if profile else None
        load = http_load(
            hub.http_port, env, run="c", kind="contact", n=n, conns=16, requests=events
        )
        result["contacts"] = phase.finish(load, events, events, expect_lines=events // 4)
        if spy:
            spy.wait()

        listener.stop()
        listener = None
        cmd_n, cmd_rate, cmd_seconds = 100, 50, (2 if quick else 4)
        log(
            f"  `command` action: {cmd_n} listeners, {cmd_rate} single-pop POSTs/s for {cmd_seconds} s"
        )
        listener = ListenProcess(
            tmp,
            env,
            hub.port,
            cmd_n,
            "product-command",
            action={"plugin": "command", "argv": ["true"]},
        )
        wait_registrations(hub, cmd_n)
        total = cmd_rate * cmd_seconds
        phase = Phase(hub, listener)
        load = http_load(
            hub.http_port, env, run="x", kind="pop", n=cmd_n, conns=4, requests=total, rate=cmd_rate
        )
        result["command"] = phase.finish(load, total, total)
        deadline = time.monotonic() + 30
        while sum(listener.action_outcomes().values()) < total and time.monotonic() < deadline:
            time.sleep(0.1)
        result["command"].update(
            latencies(listener, "x"), outcomes=listener.action_outcomes(), rate=cmd_rate
        )
        result["hub_status"] = {k: v for k, v in hub.status()["counters"].items() if v}
    finally:
        if listener is not None:
            listener.stop()
        hub.stop()
    result["loadavg_at_end"] = os.getloadavg()[0]
    probe = hub.probe()
    if probe:
        result["hub_probe"] = {
            "gc": probe["gc"],
            "stalls_over_10ms": probe["stalls_over_10ms"],
            "worst_stalls_ms": probe["worst_stalls_ms"],
            "worst_stalls_cpu_ms": probe.get("worst_stalls_cpu_ms"),
            "commits_over_2ms": probe.get("commits_over_2ms"),
            "worst_commits_ms_cpu_onloop": probe.get("worst_commits_ms_cpu_onloop"),
        }
    return result


def figures(r: dict[str, Any]) -> dict[str, float | None]:
    return {
        "single_hub_us": r["single"]["hub_us"],
        "batched_hub_us": r["batched"]["hub_us_per_pop"],
        "listen_us": r["batched"]["listener_us_per_pop"],
        "open_p99_ms": r["open"]["p99_ms"],
        "contacts_hub_us": r["contacts"]["hub_us"],
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Checked on the medians when there were several runs, else on the one run."""
    got = r.get("medians") or figures(r)
    out = []
    for key, what, target, unit in TARGETS:
        value = got[key]
        met = value is not None and value <= target
        out.append({"key": key, "target": what.replace("N ", f"{r['listeners']:,} ") + f" ≤ {target} {unit}",
                    "figure": value, "unit": unit, "met": met, "cause": None if met else CAUSES[key]})  # fmt: skip
    return out


def table(r: dict[str, Any]) -> str:
    n = f"{r['listeners']:,}"
    rows = [
        (
            "path",
            "req/s",
            "hub µs/req",
            "hub µs/pop",
            "listen µs/pop",
            "load µs/req",
            "p50 ms",
            "p99 ms",
        )
    ]

    def row(label: str, p: dict[str, Any], lat: bool = False) -> None:
        rows.append((
            label, f"{p['per_second'] or 0:,}", f"{p['hub_us']:g}", f"{p['hub_us_per_pop']:g}",
            "-" if p["listener_us_per_pop"] is None else f"{p['listener_us_per_pop']:g}",
            f"{p['load_us']:g}",
            f"{p['p50_ms']}" if lat else "-", f"{p['p99_ms']}" if lat else "-",
        ))  # fmt: skip

    row(f"1 pop/POST, 16 conns, closed loop → {n} listeners", r["single"])
    row(f"100 pops/POST, 4 conns → {n} listeners", r["batched"])
    row(f"1,000 POST/s open loop, 16 conns → {n} listeners", r["open"], lat=True)
    row("POST /v1/contacts, 1 event/req, 16 conns", r["contacts"])
    c = r["command"]
    row(f"`command` action, {c['rate']} POST/s → 100 listeners", c, lat=True)
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(x, widths, strict=True))
        )
        for x in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [
        "",
        f"(contacts: µs per event; 1 pop per 4 events. command action outcomes: {c['outcomes']}; "
        f"open loop: {r['open']['received']:,} received, {r['open']['duplicated']} duplicated, max {r['open']['max_ms']} ms)",
        f"(load average {r['loadavg_at_start']:.2f} at the start, {r['loadavg_at_end']:.2f} at the end on "
        f"{os.cpu_count()} cores: CPU per pop grows and latency queues when other work shares them)",
    ]
    return "\n".join(lines + notes)


def summary(r: dict[str, Any]) -> str:
    lines = []
    for t in targets(r):
        mark = "met" if t["met"] else "gap"
        lines.append(f"[{mark:>3}] {t['target']}: {t['figure']} {t['unit']}")
        if t["cause"]:
            lines.append(f"        cause: {t['cause']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a quarter of the requests")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout at the end")
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=1, help="repeat; medians are printed")
    parser.add_argument(
        "--profile", metavar="DIR", help="py-spy raw profiles of the hub and the listener into DIR"
    )
    parser.add_argument(
        "--probe", action="store_true", help="the hub under _hub_probe.py: GC pauses, loop stalls"
    )
    args = parser.parse_args()
    fanout.PROBE = args.probe
    raise_nofile()
    out = sys.stderr if args.json else sys.stdout

    def log(text: str) -> None:
        print(text, file=out, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="spop-product-"))
    env = dict(os.environ)
    env["SPOP_DIAG_DIR"] = str(tmp / "diag")
    profile = Path(args.profile) if args.profile else None
    if profile:
        profile.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for i in range(args.runs):
            log(
                f"product paths, run {i + 1} of {args.runs}: {args.listeners:,} listeners in one `spop listen`"
            )
            # each run its own hub journal: the pop ids repeat from run to run, and a journal
            # kept would make them duplicates (accepted, never sent) within its dedupe window
            here = tmp / f"run{i + 1}"
            here.mkdir()
            runs.append(run(here, env, log, n=args.listeners, quick=args.quick, profile=profile))
            print(table(runs[-1]), file=out)
            if "hub_probe" in runs[-1]:
                print(f"hub probe: {json.dumps(runs[-1]['hub_probe'])}", file=out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = runs[-1]
    if len(runs) > 1:
        med = {k: statistics.median(f[k] for f in map(figures, runs)) for k in figures(runs[0])}
        log("medians: " + ", ".join(f"{k} {v:g}" for k, v in med.items()))
        result = {**result, "medians": med, "runs": [figures(x) for x in runs]}
    print(file=out)
    print(summary(result), file=out)
    if args.json:
        with contextlib.suppress(BrokenPipeError):
            print(json.dumps(result))


if __name__ == "__main__":
    main()
