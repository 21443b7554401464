"""spop fan-out benchmark: latency, sustained rate, throughput, memory, restart, cold start.

    python benchmarks/fanout.py [--quick] [--json] [--listeners 1,100,1000,10000] [--rate 1000]
                                [--duration S] [--no-mqtt] [--profile FILE]

Starts its own hub (`spop serve`, journal on, loopback, free ports) and its own load processes
(benchmarks/_spop_load.py), then runs the same workload through mosquitto with paho-mqtt clients
(benchmarks/_mqtt_load.py) when mosquitto is installed. See benchmarks/README.md for what each figure
means. Everything is bounded: every load loop stops by itself; only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import raise_nofile, wire_size  # noqa: E402

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the test extras
    psutil = None  # type: ignore[assignment]


@dataclass
class Plan:
    listeners: list[int]
    rate: float = 1000.0
    duration: float = 5.0  # the latency run at `rate`
    steps: list[int] = field(
        default_factory=lambda: [1000, 2000, 5000, 10000, 15000, 20000, 25000, 30000, 40000]
    )
    step_seconds: float = 2.0
    p99_limit_ms: float = 10.0
    total: int = 60_000  # throughput run, one pop per publish frame
    total_batched: int = 100_000  # throughput run, `batch` pops per publish frame (spop only)
    batch: int = 100
    window: int = 1000  # pops (messages) published and not yet answered
    regs_per_conn: int = 1  # registrations per listener connection (1: one desktop, one connection)
    restart_listeners: int = 1000
    restart_interval: float = 2.0
    cold_runs: int = 10
    mqtt: bool = True
    quick: bool = False


def quick_plan(listeners: list[int] | None) -> Plan:
    return Plan(
        listeners=listeners or [1, 1000],
        duration=1.0,
        steps=[2000, 5000, 10000],
        step_seconds=0.5,
        total=8000,
        total_batched=20_000,
        restart_listeners=200,
        restart_interval=1.0,
        cold_runs=3,
        quick=True,
    )


# ------------------------------------------------------------------------------------ processes


class Worker:
    """A load process driven by JSON lines on stdin; answers are JSON lines on stdout."""

    def __init__(self, name: str, argv: list[str], tmp: Path, env: dict[str, str]) -> None:
        self.name = name
        self.errpath = tmp / f"{name}.err"
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.errpath, "wb"),  # noqa: SIM115
            cwd=HERE,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.decode())
        self.lines.put(None)

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(
                f"{self.name}: no answer in {timeout:g} s{self.stderr_tail()}"
            ) from None
        if line is None:
            raise RuntimeError(f"{self.name} exited (rc {self.proc.poll()}){self.stderr_tail()}")
        return json.loads(line)

    def call(self, wait: float = 120.0, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        return self.read(wait)

    def stderr_tail(self) -> str:
        try:
            text = self.errpath.read_text(errors="replace").strip()
        except OSError:
            return ""
        return f"\n--- {self.name} stderr ---\n{text[-2000:]}" if text else ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call(wait=20, cmd="quit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


HUB_ARGS: list[str] = []  # extra `spop serve` options (--hub-arg)
PROBE = False  # run the hub under _hub_probe.py (--probe)


def spop_command() -> list[str]:
    """The `spop` of this interpreter's environment (an `spop` earlier on PATH may be another
    venv's: comparing two trees by running each one's python would measure one of them twice)."""
    beside = Path(sys.executable).parent / "spop"
    exe = str(beside) if beside.exists() else shutil.which("spop")
    return [exe] if exe else [sys.executable, "-m", "spop_cli"]


class HubProcess:
    def __init__(self, tmp: Path, env: dict[str, str], name: str = "hub") -> None:
        self.tmp, self.env, self.name = tmp, env, name
        self.journal = tmp / f"{name}-journal.sqlite3"
        self.ready_file = tmp / f"{name}-ready.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.http_port = 0
        self.probe_file = tmp / f"{name}-probe.json"

    def probe(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.probe_file.read_text())
        except (OSError, ValueError):
            return None

    def start(self, port: int = 0, http_port: int = 0) -> float:
        """Start and wait for the ready file; returns the monotonic time it appeared."""
        with contextlib.suppress(FileNotFoundError):
            self.ready_file.unlink()
        command = spop_command()
        if PROBE:
            command = [sys.executable, str(HERE / "_hub_probe.py"), str(self.probe_file)]
        argv = [
            *command,
            "serve",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--http-port", str(http_port),
            "--journal", str(self.journal),
            "--ready-file", str(self.ready_file),
            *HUB_ARGS,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / f"{self.name}.err", "ab"),  # noqa: SIM115
            env=self.env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                ready_at = time.monotonic()
                info = json.loads(self.ready_file.read_text())
                self.port, self.http_port = info["port"], info["http_port"]
                return ready_at
            if self.proc.poll() is not None:
                break
            time.sleep(0.005)
        err = (self.tmp / f"{self.name}.err").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the hub did not start:\n{err}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http_port}/v1/status"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )


class MosquittoProcess:
    def __init__(self, binary: str, tmp: Path) -> None:
        self.binary, self.tmp = binary, tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        self.port = free_port()
        conf = self.tmp / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    "allow_anonymous true",
                    "persistence false",  # QoS 1 in memory; mosquitto only snapshots to disk anyway
                    "max_inflight_messages 1000",  # broker → each subscriber (default 20)
                    "max_queued_messages 1000000",  # default 1000 would drop QoS 1 under bursts
                    "max_connections -1",
                    "set_tcp_nodelay true",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "",
                ]
            )
        )
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / "mosquitto.err", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(
            f"mosquitto did not start: {(self.tmp / 'mosquitto.err').read_text()[-1000:]}"
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rss(pid: int) -> int:
    if psutil is not None:
        return psutil.Process(pid).memory_info().rss
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    if psutil is None:
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


# ------------------------------------------------------------------------------------ one config


class Run:
    """Publisher + listeners of one system for one listener count."""

    def __init__(self, kind: str, server: Any, pub: Worker, lst: Worker, n: int) -> None:
        self.kind, self.server, self.pub, self.lst, self.n = kind, server, pub, lst, n
        self.counter = 0

    def tag(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def drain(self, run: str, expected: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.lst.call(cmd="count", run=run)["unique"] >= expected:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def open_loop(self, rate: float, duration: float) -> dict[str, Any]:
        run = self.tag("o")
        sent = self.pub.call(
            wait=duration + 120, cmd="open", run=run, rate=rate, duration=duration, n=self.n
        )
        drained = self.drain(run, sent["sent"], timeout=10 + duration)
        got = self.lst.call(cmd="report", run=run, expected=sent["sent"])
        self.lst.call(cmd="drop", run=run)
        return {
            "rate": rate,
            "duration": duration,
            "sent": sent["sent"],
            "answered": sent["oks"],
            "drained": drained,
            "lost": got["lost"],
            "duplicated": got["duplicated"],
            "p50_ms": got["p50_ms"],
            "p99_ms": got["p99_ms"],
            "max_ms": got["max_ms"],
            "from_send_p50_ms": got["from_send_p50_ms"],
            "from_send_p99_ms": got["from_send_p99_ms"],
            "max_send_lag_ms": sent["max_send_lag_ms"],
            "worst": got["worst"],
            "source_errors": sent["error_count"],
        }

    def window(self, total: int, window: int, batch: int) -> dict[str, Any]:
        run = self.tag("t")
        procs = {"server": self.server.pid, "publisher": self.pub.pid, "listeners": self.lst.pid}
        cpu0 = {k: cpu_seconds(p) for k, p in procs.items()}
        acked0 = self.server.status()["counters"].get("acked", 0) if self.kind == "spop" else 0
        wall0 = time.monotonic()
        sent = self.pub.call(
            wait=300, cmd="window", run=run, total=total, window=window, batch=batch, n=self.n
        )
        drained = self.drain(run, sent["sent"], timeout=60)
        wall = time.monotonic() - wall0
        cpu = {k: round(100 * (cpu_seconds(p) - cpu0[k]) / wall) for k, p in procs.items()}
        got = self.lst.call(cmd="report", run=run, expected=sent["sent"])
        self.lst.call(cmd="drop", run=run)
        elapsed = (got["last_ns"] - sent["start_ns"]) / 1e9 if got["last_ns"] else float("nan")
        out = {
            "pops": sent["sent"],
            "batch": batch,
            "window": window,
            "seconds": round(elapsed, 3),
            "per_second": round(sent["sent"] / elapsed) if elapsed > 0 else None,
            "lost": got["lost"],
            "duplicated": got["duplicated"],
            "drained": drained,
            "cpu_percent": cpu,
        }
        if self.kind == "spop":
            deadline = time.monotonic() + 10
            while True:
                acked = self.server.status()["counters"].get("acked", 0) - acked0
                if acked >= sent["sent"] or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            out["hub_acked"] = acked
        return out


def measure(
    kind: str, n: int, plan: Plan, tmp: Path, env: dict[str, str], log: Any, profile: str | None
) -> dict[str, Any]:
    conns = max(1, -(-n // plan.regs_per_conn))
    if kind == "spop":
        server: Any = HubProcess(tmp, env, name=f"hub-{n}")
        server.start()
        module = "_spop_load.py"
        listeners_role = "listeners"
    else:
        server = MosquittoProcess(mosquitto_binary() or "", tmp)
        server.start()
        module = "_mqtt_load.py"
        listeners_role = "subscribers"
    pub = lst = None
    result: dict[str, Any] = {"listeners": n, "connections": conns}
    try:
        pub = Worker(f"{kind}-pub-{n}", [module, "publisher", "--port", str(server.port)], tmp, env)
        pub.read(60)
        if kind == "spop":
            server.status()
        time.sleep(0.3)
        rss0 = rss(server.pid)
        t0 = time.monotonic()
        lst = Worker(
            f"{kind}-lst-{n}",
            [
                module,
                listeners_role,
                "--port",
                str(server.port),
                "--n",
                str(n),
                "--conns",
                str(conns),
            ],
            tmp,
            env,
        )
        ready = lst.read(300)
        result["register_seconds"] = round(time.monotonic() - t0, 3)
        time.sleep(0.5)
        rss1 = rss(server.pid)
        result["rss_before_mb"] = round(rss0 / 2**20, 1)
        result["rss_listeners_mb"] = round(rss1 / 2**20, 1)
        result["bytes_per_listener"] = round((rss1 - rss0) / n) if n >= 100 else None
        if kind == "spop":
            t_status = time.perf_counter()
            status = server.status()
            result["status_ms"] = round(1000 * (time.perf_counter() - t_status), 1)
            result["hub_registrations"] = status["registrations"]
            result["hub_connections"] = status["connections"] - 1  # minus the publisher
        log(
            f"  {kind}: {ready['registrations']} listeners on {ready['connections']} connections up"
        )
        run = Run(kind, server, pub, lst, n)
        run.open_loop(min(plan.rate, 1000), 0.3)  # warm-up, not reported
        result["latency"] = run.open_loop(plan.rate, plan.duration)
        lat = result["latency"]
        log(
            f"  {kind}: latency @{plan.rate:g}/s p50 {lat['p50_ms']} p99 {lat['p99_ms']} max {lat['max_ms']} ms,"
            f" lost {lat['lost']} dup {lat['duplicated']} (from the actual send: p99 {lat['from_send_p99_ms']} ms;"
            f" source late by up to {lat['max_send_lag_ms']} ms)"
        )
        steps = []
        best = 0
        for rate in plan.steps:
            step = run.open_loop(rate, plan.step_seconds)
            ok = (
                step["p99_ms"] is not None
                and step["p99_ms"] < plan.p99_limit_ms
                and step["lost"] == 0
                and step["duplicated"] == 0
                and step["drained"]
            )
            step["ok"] = ok
            steps.append(step)
            log(
                f"  {kind}: step {rate}/s p99 {step['p99_ms']} ms max {step['max_ms']} ms lost {step['lost']}"
                f" (from send p99 {step['from_send_p99_ms']}, source late ≤ {step['max_send_lag_ms']} ms)"
                f" {'ok' if ok else 'FAIL'}"
                + ("" if ok else f" (slowest at [s, ms]: {step['worst']})")
            )
            if not ok:
                break
            best = rate
        result["steps"] = steps
        result["max_rate_p99_under_limit"] = best
        result["max_rate_capped"] = (
            bool(steps) and steps[-1]["ok"]
        )  # never failed: the real limit is higher
        profiler = start_profiler(profile, server.pid, tmp) if profile and kind == "spop" else None
        result["throughput"] = run.window(plan.total, plan.window, 1)
        if profiler is not None:
            stop_profiler(profiler, profile)
        thr = result["throughput"]
        log(
            f"  {kind}: throughput {thr['per_second']}/s (1 pop per message), cpu {thr['cpu_percent']}"
        )
        if kind == "spop" and plan.total_batched:
            result["throughput_batched"] = run.window(
                plan.total_batched, plan.window * 5, plan.batch
            )
            thb = result["throughput_batched"]
            log(
                f"  {kind}: throughput {thb['per_second']}/s ({plan.batch} pops per publish frame), cpu {thb['cpu_percent']}"
            )
        result["rss_end_mb"] = round(rss(server.pid) / 2**20, 1)
        result["listener_side"] = lst.call(cmd="info")
        if kind == "spop":
            time.sleep(0.3)
            counters = server.status()["counters"]
            result["hub_counters"] = {
                k: counters.get(k, 0)
                for k in (
                    "pops_accepted",
                    "delivered",
                    "acked",
                    "pending",
                    "expired",
                    "duplicates",
                    "unknown_acks",
                    "slow_consumers_dropped",
                    "dead_peers",
                    "frame_errors",
                    "rejected",
                )
            }
    finally:
        for worker in (lst, pub):
            if worker is not None:
                worker.stop()
        server.stop()
    if kind == "spop" and PROBE:
        result["hub_probe"] = probe = server.probe()
        if probe:
            log(
                f"  spop probe: gc {probe['gc']}; loop stalls >2 ms {probe['stalls_over_2ms']}, >10 ms {probe['stalls_over_10ms']}, worst {probe['worst_stalls_ms']}"
            )
    return result


# ------------------------------------------------------------------------------------ profiling


def start_profiler(out: str, pid: int, tmp: Path) -> subprocess.Popen[bytes] | None:
    """py-spy (sampling the hub from outside, no change to it) in raw (collapsed-stack) format."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy not installed (pip install py-spy): no profile", file=sys.stderr)
        return None
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            out,
            "--rate",
            "250",
            "--nonblocking",
            *(["--native"] if os.environ.get("SPOP_BENCH_NATIVE") else []),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "py-spy.err", "ab"),  # noqa: SIM115
    )
    time.sleep(1.0)  # let it attach
    return proc


def stop_profiler(proc: subprocess.Popen[bytes], out: str) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def top_frames(raw: str, count: int = 15) -> dict[str, Any]:
    """The hottest functions of a py-spy raw (collapsed-stack) profile: self % and total %.

    Frames are folded per function (line numbers dropped); "self" is where the sample was taken.
    """
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in Path(raw).read_text().splitlines():
        stack, _, weight = line.rpartition(" ")
        if not stack:
            continue
        w = int(weight)
        samples += w
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + w
        own[frames[-1]] = own.get(frames[-1], 0) + w
    ranked = sorted(own, key=lambda f: own[f], reverse=True)[:count]
    return {
        "samples": samples,
        "top": [
            {
                "frame": f,
                "self_pct": round(100 * own[f] / samples, 1),
                "total_pct": round(100 * total[f] / samples, 1),
            }
            for f in ranked
        ],
    }


# ------------------------------------------------------------------------------------ restart


def measure_restart(plan: Plan, tmp: Path, env: dict[str, str], log: Any) -> dict[str, Any]:
    hub = HubProcess(tmp, env, name="hub-restart")
    hub.start()
    n, interval = plan.restart_listeners, plan.restart_interval
    worker = Worker(
        "restart",
        ["_restart.py", "--port", str(hub.port), "--n", str(n), "--interval", str(interval)],
        tmp,
        env,
    )
    try:
        ready = worker.read(300)
        before = hub.status()["registrations"]
        log(
            f"  restart: {ready['up']} AsyncListeners Up in {ready['seconds']:.1f} s; hub holds {before}"
        )
        worker.call(cmd="arm")
        port, http_port = hub.port, hub.http_port
        killed = time.monotonic()
        hub.stop(signal.SIGTERM)
        stopped = time.monotonic()
        ready_at = hub.start(port, http_port)
        back = worker.call(wait=60 + 20 * interval, cmd="watch", timeout=30 + 15 * interval)
        after = hub.status()["registrations"]
        all_up = back["all_up_ns"] / 1e9 if back["all_up_ns"] else None
        out: dict[str, Any] = {
            "listeners": n,
            "reconnecting_interval": interval,
            "registrations_before": before,
            "registrations_after": after,
            "all_back_up": bool(all_up),
            "statuses": back["statuses"],
            "hub_stop_seconds": round(stopped - killed, 3),
            "hub_down_seconds": round(ready_at - killed, 3),
        }
        if all_up:
            out["seconds_from_sigterm"] = round(all_up - killed, 3)
            out["seconds_from_hub_ready"] = round(all_up - ready_at, 3)
            out["intervals_from_sigterm"] = round((all_up - killed) / interval, 2)
            out["intervals_from_hub_ready"] = round((all_up - ready_at) / interval, 2)
        return out
    finally:
        worker.stop()
        hub.stop()


# ------------------------------------------------------------------------------------ cold start


def median_wall(argv: list[str], runs: int, env: dict[str, str]) -> dict[str, Any]:
    times = []
    rc = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, timeout=60
        )
        times.append(time.perf_counter() - t0)
        rc = rc or done.returncode
    return {
        "median_ms": round(1000 * statistics.median(times), 1),
        "min_ms": round(1000 * min(times), 1),
        "runs": runs,
        "rc": rc,
    }


def measure_cold(
    plan: Plan, tmp: Path, env: dict[str, str], mqtt_port: int | None
) -> dict[str, Any]:
    spop = spop_command()
    out: dict[str, Any] = {
        "python -c pass": median_wall([sys.executable, "-c", "pass"], plan.cold_runs, env)
    }
    out["spop --version"] = median_wall([*spop, "--version"], plan.cold_runs, env)
    hub = HubProcess(tmp, env, name="hub-cold")
    hub.start()
    try:
        out["spop send"] = median_wall(
            [
                *spop,
                "send",
                "telephone",
                "100000",
                "--server",
                f"{hub.port}@127.0.0.1",
                "--source",
                "12345",
            ],
            plan.cold_runs,
            env,
        )
    finally:
        hub.stop()
    if mqtt_port:
        code = (
            "import paho.mqtt.publish as p; "
            f"p.single('spop/telephone/100000', '{{}}', qos=1, hostname='127.0.0.1', port={mqtt_port})"
        )
        out["paho publish.single"] = median_wall([sys.executable, "-c", code], plan.cold_runs, env)
    return out


# ------------------------------------------------------------------------------------ report


def ratio(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b:
        return "-"
    return f"{a / b:.2f}"


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value < 10:
            return f"{value:.3f}"
        return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _best_rate(r: dict[str, Any]) -> str | None:
    """The highest passing step; "+" when no step failed (the real limit is higher)."""
    if not r:
        return None
    return f"{r['max_rate_p99_under_limit']:,}{'+' if r['max_rate_capped'] else ''}"


def _kb(value: Any) -> float | None:
    return value / 1024 if isinstance(value, int | float) else None


def config_rows(config: dict[str, Any], rate: float) -> list[tuple[str, str, str, str, str]]:
    s, m = config["spop"], config.get("mqtt") or {}
    sl, ml = s["latency"], m.get("latency", {})
    mt = m.get("throughput", {})
    figures: list[tuple[str, Any, Any, bool]] = [
        (f"latency p50 @{rate:g}/s (ms)", sl["p50_ms"], ml.get("p50_ms"), True),
        (f"latency p99 @{rate:g}/s (ms)", sl["p99_ms"], ml.get("p99_ms"), True),
        (f"latency max @{rate:g}/s (ms)", sl["max_ms"], ml.get("max_ms"), True),
        (
            "  p99 from the actual send (ms)",
            sl["from_send_p99_ms"],
            ml.get("from_send_p99_ms"),
            True,
        ),
        (
            "lost / duplicated",
            f"{sl['lost']} / {sl['duplicated']}",
            f"{ml.get('lost')} / {ml.get('duplicated')}",
            False,
        ),
        ("max rate with p99 < 10 ms (/s)", _best_rate(s), _best_rate(m), False),
        ("throughput, acked (msg/s)", s["throughput"]["per_second"], mt.get("per_second"), True),
    ]
    if "throughput_batched" in s:
        batched = s["throughput_batched"]
        figures.append(
            (
                f"throughput, {batched['batch']} pops/publish (/s)",
                batched["per_second"],
                None,
                False,
            )
        )
    figures.append(
        (
            "server RSS per listener (KB)",
            _kb(s.get("bytes_per_listener")),
            _kb(m.get("bytes_per_listener")),
            True,
        )
    )
    rows = []
    for i, (label, a, b, show_ratio) in enumerate(figures):
        if label.startswith("max rate"):
            a_rate, b_rate = s["max_rate_p99_under_limit"], m.get("max_rate_p99_under_limit")
            r = ratio(a_rate, b_rate) if m else ""
        else:
            r = ratio(a, b) if m and show_ratio else ""
        rows.append(
            (f"{config['listeners']:,}" if i == 0 else "", label, fmt(a), fmt(b) if m else "n/a", r)
        )
    return rows


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str, str]] = []
    for config in results["configs"]:
        rows.extend(config_rows(config, results["plan"]["rate"]))
    restart = results.get("restart")
    if restart:
        value = (
            f"{restart['seconds_from_sigterm']:.2f} s = {restart['intervals_from_sigterm']:.2f} intervals"
            if restart.get("all_back_up")
            else "NOT all back"
        )
        rows.append(
            (
                f"{restart['listeners']:,}",
                "all Up again after hub restart (from SIGTERM)",
                value,
                "not measured",
                "",
            )
        )
        if restart.get("all_back_up"):
            rows.append(
                (
                    "",
                    "  … from the restarted hub's ready",
                    f"{restart['seconds_from_hub_ready']:.2f} s",
                    "",
                    "",
                )
            )
    cold = results.get("cold_start", {})
    for name, other in (("spop --version", None), ("spop send", "paho publish.single")):
        if name in cold:
            b = cold.get(other, {}).get("median_ms") if other else None
            rows.append(
                (
                    "-",
                    f"{name} wall, median (ms)",
                    fmt(cold[name]["median_ms"]),
                    fmt(b) if other else "",
                    ratio(cold[name]["median_ms"], b) if b else "",
                )
            )
    if "python -c pass" in cold:
        rows.append(
            ("-", "python -c pass (floor) (ms)", fmt(cold["python -c pass"]["median_ms"]), "", "")
        )
    header = ("listeners", "figure", "spop", "mosquitto+paho", "spop/mqtt")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    configs = {c["listeners"]: c for c in results["configs"]}
    out = []

    def add(target: str, met: bool | None, figure: str) -> None:
        out.append({"target": target, "met": met, "figure": figure})

    c1000 = configs.get(1000)
    if c1000 and results["plan"]["rate"] == 1000:
        lat = c1000["spop"]["latency"]
        met = (
            lat["p99_ms"] is not None
            and lat["p99_ms"] < 2
            and lat["lost"] == 0
            and lat["duplicated"] == 0
        )
        add("p99 < 2 ms at 1,000 pops/s, 1,000 listeners, 0 lost, 0 duplicated", met,
            f"p99 {lat['p99_ms']} ms, lost {lat['lost']}, duplicated {lat['duplicated']}")  # fmt: skip
    else:
        add(
            "p99 < 2 ms at 1,000 pops/s, 1,000 listeners",
            None,
            "not measured (needs --listeners 1000 --rate 1000)",
        )
    canon = c1000 or (results["configs"][-1] if results["configs"] else None)
    if canon:
        thr = canon["spop"]["throughput"]["per_second"] or 0
        extra = canon["spop"].get("throughput_batched", {}).get("per_second")
        add("≥ 20,000 pops/s through one hub with acknowledgements", thr >= 20000,
            f"{thr:,}/s one pop per publish frame at {canon['listeners']:,} listeners"
            + (f" ({extra:,}/s with {canon['spop']['throughput_batched']['batch']} pops per frame)" if extra else ""))  # fmt: skip
    biggest = max((c for c in results["configs"] if c["spop"].get("bytes_per_listener") is not None),
                  key=lambda c: c["listeners"], default=None)  # fmt: skip
    if biggest:
        bpl = biggest["spop"]["bytes_per_listener"]
        add("< 10 KB of hub memory per registered listener", bpl < 10 * 1024,
            f"{bpl / 1024:.1f} KB at {biggest['listeners']:,} listeners ({biggest['connections']:,} connections)")  # fmt: skip
    restart = results.get("restart")
    if restart:
        ok = restart.get("all_back_up") and restart["intervals_from_sigterm"] <= 2
        figure = (
            f"{restart['seconds_from_sigterm']:.2f} s = {restart['intervals_from_sigterm']:.2f} × "
            f"{restart['reconnecting_interval']:g} s for {restart['listeners']:,} listeners"
            if restart.get("all_back_up")
            else f"not all back: {restart['statuses']}"
        )
        add(
            f"{restart['listeners']:,} listeners back Up within two reconnecting intervals",
            bool(ok),
            figure,
        )
    if canon and canon.get("mqtt"):
        s, m = canon["spop"], canon["mqtt"]
        thr_ok = (s["throughput"]["per_second"] or 0) >= (m["throughput"]["per_second"] or 0)
        p99_ok = (s["latency"]["p99_ms"] or 1e9) <= (m["latency"]["p99_ms"] or 1e9)
        add("throughput ≥ mosquitto + paho, p99 no worse", thr_ok and p99_ok,
            f"{s['throughput']['per_second']:,} vs {m['throughput']['per_second']:,} msg/s; "
            f"p99 {s['latency']['p99_ms']} vs {m['latency']['p99_ms']} ms at {canon['listeners']:,} listeners")  # fmt: skip
    else:
        add("throughput ≥ mosquitto + paho, p99 no worse", None, "mosquitto not run")
    cold = results.get("cold_start", {})
    if "spop --version" in cold:
        v = cold["spop --version"]["median_ms"]
        add("spop --version < 150 ms", v < 150, f"{v} ms median")
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total if psutil else 0
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
    }


def versions(mosquitto: str | None) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("spop", "paho-mqtt", "orjson", "uvloop"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    if mosquitto:
        with contextlib.suppress(Exception):
            text = subprocess.run(
                [mosquitto, "-h"], capture_output=True, text=True, timeout=5
            ).stdout
            out["mosquitto"] = text.splitlines()[0].replace("mosquitto version ", "")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (after the table, on stdout)"
    )
    parser.add_argument(
        "--listeners", help="comma-separated listener counts (default 1,100,1000,10000)"
    )
    parser.add_argument(
        "--rate", type=float, help="offered rate of the latency run, pops/s (default 1000)"
    )
    parser.add_argument(
        "--duration", type=float, help="seconds of the latency run (default 5; quick 1)"
    )
    parser.add_argument(
        "--regs-per-conn",
        type=int,
        default=1,
        help="registrations per listener connection (default 1)",
    )
    parser.add_argument(
        "--steps", help='comma-separated rates of the max-rate search ("" skips it)'
    )
    parser.add_argument("--no-mqtt", action="store_true", help="skip the mosquitto comparison")
    parser.add_argument(
        "--no-restart", action="store_true", help="skip the hub-restart measurement"
    )
    parser.add_argument(
        "--hub-arg",
        action="append",
        default=[],
        metavar="OPT",
        help="extra `spop serve` option (repeatable), e.g. --hub-arg=--heartbeat=30",
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="run the hub under _hub_probe.py: GC pauses and event-loop stalls",
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="py-spy the hub during the 1,000-listener throughput run"
    )
    parser.add_argument(
        "--no-product", action="store_true", help="skip the product paths (product_paths.py)"
    )
    parser.add_argument(
        "--product-only",
        action="store_true",
        help="only the product paths: POST /v1/pops, /v1/contacts, the real `spop listen`",
    )
    args = parser.parse_args()

    HUB_ARGS.extend(args.hub_arg)
    global PROBE
    PROBE = args.probe
    listeners = [int(x) for x in args.listeners.split(",")] if args.listeners else None
    plan = (
        quick_plan(listeners) if args.quick else Plan(listeners=listeners or [1, 100, 1000, 10000])
    )
    if args.rate:
        plan.rate = args.rate
    if args.duration:
        plan.duration = args.duration
    plan.regs_per_conn = max(1, args.regs_per_conn)
    if args.steps is not None:
        plan.steps = [int(x) for x in args.steps.split(",") if x.strip()]
    mosquitto = None if args.no_mqtt else mosquitto_binary()
    plan.mqtt = mosquitto is not None

    def log(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    if not args.no_mqtt and mosquitto is None:
        log(
            "mosquitto is not installed (apt-get install mosquitto): the MQTT comparison is skipped"
        )
    nofile = raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="spop-bench-"))
    env = dict(os.environ)
    env["SPOP_DIAG_DIR"] = str(tmp / "diag")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/fanout.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(mosquitto),
        "plan": asdict(plan),
        "payload_bytes": wire_size(),
        "journal": "on (SQLite WAL, synchronous=NORMAL)",
        "hub_args": HUB_ARGS,
        "mosquitto": {"available": mosquitto is not None, "persistence": False}
        if not args.no_mqtt
        else {"skipped": True},
        "nofile": nofile,
        "configs": [],
    }
    log(
        f"spop fan-out benchmark: {results['machine']['nproc']} cores, {results['machine']['cpu']}, Python {results['machine']['python']}; scratch {tmp}"
    )
    profile_n = 1000 if 1000 in plan.listeners else max(plan.listeners)
    if args.product_only:
        plan.listeners, args.no_restart = [], True
    try:
        for n in plan.listeners:
            log(f"{n:,} listeners")
            config: dict[str, Any] = {
                "listeners": n,
                "connections": max(1, -(-n // plan.regs_per_conn)),
            }
            profile = args.profile if n == profile_n else None
            config["spop"] = measure("spop", n, plan, tmp, env, log, profile)
            if mosquitto:
                config["mqtt"] = measure("mqtt", n, plan, tmp, env, log, None)
            results["configs"].append(config)
        if not args.no_restart:
            log(
                f"hub restart with {plan.restart_listeners:,} AsyncListeners, reconnecting_interval {plan.restart_interval:g} s"
            )
            results["restart"] = measure_restart(plan, tmp, env, log)
        if not args.product_only:
            log("cold start")
            mq = None
            if mosquitto:
                mq = MosquittoProcess(mosquitto, tmp)
                mq.start()
            try:
                results["cold_start"] = measure_cold(plan, tmp, env, mq.port if mq else None)
            finally:
                if mq:
                    mq.stop()
        if not args.no_product:
            import product_paths

            log("product paths: 1,000 listeners in one real `spop listen --config --json`")
            here = tmp / "product"  # a journal of its own (product_paths.py, main)
            here.mkdir()
            results["product"] = product_paths.run(here, env, log, n=1000, quick=plan.quick)
    finally:
        results["seconds"] = round(time.monotonic() - started, 1)
        results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = targets(results) if results["configs"] else []
    if args.profile and Path(args.profile).exists():
        results["profile"] = top_frames(args.profile)
    print()
    print(table(results), file=sys.stderr if args.json else sys.stdout)
    print(file=sys.stderr if args.json else sys.stdout)
    for t in results["targets"]:
        mark = {True: "met", False: "NOT MET", None: "n/a"}[t["met"]]
        print(
            f"[{mark:>7}] {t['target']}: {t['figure']}",
            file=sys.stderr if args.json else sys.stdout,
        )
    if "product" in results:
        import product_paths

        out = sys.stderr if args.json else sys.stdout
        print("\nproduct paths (issue 15)", file=out)
        print(product_paths.table(results["product"]), file=out)
        print(file=out)
        print(product_paths.summary(results["product"]), file=out)
        results["product"]["targets"] = product_paths.targets(results["product"])
    if "profile" in results:
        out = sys.stderr if args.json else sys.stdout
        print(
            f"\nhub profile ({results['profile']['samples']} samples, py-spy raw in {args.profile}):",
            file=out,
        )
        print(f"{'self %':>7} {'total %':>8}  function", file=out)
        for row in results["profile"]["top"]:
            print(f"{row['self_pct']:7.1f} {row['total_pct']:8.1f}  {row['frame']}", file=out)
    print(
        f"\n{results['seconds']:.0f} s; payload {results['payload_bytes']} bytes per delivered pop",
        file=sys.stderr if args.json else sys.stdout,
    )
    if args.json:
        print(json.dumps(results))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
