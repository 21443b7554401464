"""How long a desktop that comes back takes to drain a big backlog (issue 10, section 1).

`spop serve` (journal on) and `spop listen telephone 6666 --json` (uvloop, as the CLI runs) as
real processes. The listener registers, is frozen with SIGSTOP, 30,000 pops with 1 KB of contact
data each are POSTed in batches of 500, then it is thawed with SIGCONT. The drain time runs from
SIGCONT until the hub holds nothing pending and the listener has printed every pop. Each pop must
reach the listener's stdout exactly once, and none may expire.

    python benchmarks/backlog_drain.py              # 3 runs, the median
    python benchmarks/backlog_drain.py --runs 5 --pops 30000 --size 1024 --max-inflight 1000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

RESOURCE = "6666"


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def post(url: str, body: Any) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"backlog_drain: {what} not done in {timeout:g} s")
        time.sleep(0.02)


def count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def one_run(workdir: Path, pops: int, size: int, inflight: int | None = None) -> dict[str, Any]:
    env = {**os.environ, "SPOP_DIAG_DIR": str(workdir / "diag"), "XDG_CONFIG_HOME": str(workdir)}
    for name in ("SPOP_CONFIG", "SPOP_SERVER", "SPOP_TOKEN"):
        env.pop(name, None)
    ready = workdir / "ready.json"
    spop = [sys.executable, "-m", "spop_cli"]
    config = workdir / "hub.toml"
    config.write_text(f"[hub]\nmax_inflight = {inflight}\n" if inflight else "")
    hub = subprocess.Popen(
        [*spop, "serve", "--port", "0", "--http-port", "0", "--ready-file", str(ready)]
        + ["--config", str(config)]
        + ["--journal", str(workdir / "journal.sqlite3"), "--heartbeat", "1"],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "hub.log", "wb"),  # noqa: SIM115
        env=env,
    )
    out = workdir / "out.jsonl"
    listener = None
    try:
        wait(ready.exists, 20, "the hub's start")
        ports = json.loads(ready.read_text())
        http = f"http://127.0.0.1:{ports['http_port']}"
        with open(out, "wb") as stdout:
            listener = subprocess.Popen(
                [*spop, "listen", "telephone", RESOURCE, "--json", "--reconnecting-interval", "1"]
                + ["--server", f"{ports['port']}@127.0.0.1"],
                stdout=stdout,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        wait(lambda: get(f"{http}/v1/status")["registrations"] == 1, 30, "registration")
        listener.send_signal(signal.SIGSTOP)
        posting = time.monotonic()
        for start in range(0, pops, 500):
            batch = [
                {
                    "media": "telephone",
                    "resource": RESOURCE,
                    "source": str(i),
                    "contact_data": {"note": f"{i:06d}" + "x" * (size - 6)},
                }
                for i in range(start, min(start + 500, pops))
            ]
            post(f"{http}/v1/pops", batch)
        posted = time.monotonic() - posting
        # frozen past three heartbeats, the hub drops it as a dead peer: it comes back, registers
        # again and gets the whole backlog replayed (the pops already in its socket come twice)
        wait(lambda: get(f"{http}/v1/status")["registrations"] == 0, 30, "the dead-peer drop")
        thawed = time.monotonic()
        listener.send_signal(signal.SIGCONT)
        wait(
            lambda: get(f"{http}/v1/status")["pending"] == 0 and count_lines(out) >= pops,
            300,
            "the drain",
        )
        drain = time.monotonic() - thawed
        listener.send_signal(signal.SIGTERM)
        listener.wait(30)
        ids = [json.loads(line)["id"] for line in out.read_bytes().splitlines() if line]
        counters = get(f"{http}/v1/status")["counters"]
        return {
            "drain_s": round(drain, 2),
            "post_s": round(posted, 2),
            "lines": len(ids),
            "distinct": len(set(ids)),
            "expired": counters.get("expired", 0),
            "frame_errors": counters.get("frame_errors", 0),
            "delivered": counters.get("delivered", 0),
        }
    finally:
        for process in (listener, hub):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pops", type=int, default=30_000)
    parser.add_argument("--size", type=int, default=1024, help="bytes of contact data per pop")
    parser.add_argument("--max-inflight", type=int, default=None, help="the hub's window")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    runs = []
    for number in range(args.runs):
        workdir = Path(tempfile.mkdtemp(prefix="spop-drain-"))
        try:
            result = one_run(workdir, args.pops, args.size, args.max_inflight)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        runs.append(result)
        print(f"run {number + 1}: {json.dumps(result)}", file=sys.stderr)
        if (result["lines"], result["distinct"]) != (args.pops, args.pops) or result["expired"]:
            raise SystemExit("backlog_drain: a pop was lost, duplicated or expired")
    median = statistics.median(r["drain_s"] for r in runs)
    if args.json:
        print(
            json.dumps(
                {"pops": args.pops, "size": args.size, "median_drain_s": median, "runs": runs}
            )
        )
    else:
        print(
            f"{args.pops} pops of {args.size} B: drain median {median:.2f} s over {len(runs)} runs"
        )


if __name__ == "__main__":
    main()
