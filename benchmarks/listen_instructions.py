"""Instructions per pop in the real `spop listen --json` process, counted by valgrind: free of noise.

    python benchmarks/listen_instructions.py [--src DIR] [--listeners 1000] [--rounds 5,20]
                                             [--batch 100] [--profile DIR]

CPU time per pop on a shared 2-core machine moves by ±30 % (and more across a day) from run to run;
an instruction count does not. This runs the real `spop listen --config FILE --json` holding N
`[[listeners]]` (on one connection since 2026-12-03, one each before) under `valgrind --tool=callgrind`,
against a minimal hub in a process of its own (not counted) that speaks the listener protocol over
real sockets on 127.0.0.1: it welcomes and registers every listener, then sends rounds of `batch`
pop frames (the frames the hub sends, each pop to the next listener in turn, as the batched
`POST /v1/pops` run does; one write per connection per round, as the hub flushes once per loop
turn), waits for every ack of a round before the next, and stops the listener
(SIGTERM) once the last is acked. Two runs with different round counts, the difference divided by
the pops between them: start-up, imports, registration and shutdown cancel out. Every instruction
of the listener process counts (the event loop, its diagnostics writer thread, the `--json` lines);
the kernel's side of the system calls does not (product_paths.py measures those). Each run checks
that every pop was printed once and acked once.

`--batch 1 --rounds 50,250` is the open loop's case: each pop arrives alone (the hub waits for its
ack before the next), in a loop turn and a read of its own, so it pays alone every per-turn cost
(the stdout flush, the diagnostics writer's wake-up, a turn for the ack if deferred) that a batch
of 100 shares.

`--src` runs another tree (e.g. a `git worktree` of an older commit) for a before/after; valgrind
must be installed. `--profile DIR` keeps the callgrind files (open with callgrind_annotate).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import callgrind_total, resource_name  # noqa: E402


def _pop(seq: int, n: int) -> dict[str, object]:
    from _http_load import pop_body

    from spop_cli.pops import normalize_pop

    return normalize_pop(pop_body("b", seq, n, 0), "2026-12-03T00:00:00.000Z")


async def _hub(listeners: int, rounds: int, batch: int) -> None:
    """The minimal hub: prints its port, serves until every pop of every round is acked."""
    import orjson

    from spop_cli.protocol import pop_frame

    registered: dict[str, asyncio.Transport] = {}  # resource → its listener's connection
    everyone = asyncio.Event()
    acked: set[str] = set()
    round_done = asyncio.Event()
    expected: set[str] = set()

    class Conn(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            *lines, self.buffer = (self.buffer + data).split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                frame = orjson.loads(line)
                op, ref = frame["op"], frame.get("ref")
                if op == "hello":
                    welcome = {"op": "welcome", "version": frame["version"], "server": "spop",
                               "heartbeat": 600, "max_frame": 65536, "pop_ttl": 120, "ref": ref}  # fmt: skip
                    if frame["version"] >= 2:
                        welcome["updates"] = bool(frame.get("updates"))
                    self.transport.write(orjson.dumps(welcome) + b"\n")
                elif op in ("register", "unregister", "bye"):
                    self.transport.write(orjson.dumps({"op": "ok", "ref": ref}) + b"\n")
                    if op == "register":
                        registered[frame["resource"]] = self.transport  # type: ignore[assignment]
                        if len(registered) == listeners:
                            everyone.set()
                elif op == "ping":
                    self.transport.write(b'{"op":"pong"}\n')
                elif op == "ack":
                    for pop_id in frame["ids"]:
                        if pop_id in acked:
                            raise SystemExit(f"pop {pop_id} acked twice")
                        acked.add(pop_id)
                    if expected <= acked:
                        round_done.set()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.wait_for(everyone.wait(), 1800)
    # the frames, built before the timed part starts (the hub's cost is not what is measured)
    frames = [pop_frame(_pop(seq, listeners)) for seq in range(rounds * batch)]
    print("registered", flush=True)
    for r in range(rounds):
        round_done.clear()
        expected.clear()
        out: dict[asyncio.Transport, list[bytes]] = {}
        for k in range(batch):
            seq = r * batch + k
            expected.add(f"b-{seq}")
            out.setdefault(registered[resource_name(seq % listeners)], []).append(frames[seq])
        for transport, chunks in out.items():  # one write per connection and turn, as the hub
            transport.write(b"".join(chunks))
        await asyncio.wait_for(round_done.wait(), 600)
    print(f"acked {len(acked)}", flush=True)
    await asyncio.sleep(3600)  # until the parent stops us, after the listener has shut down


def _run(
    src: str | None,
    listeners: int,
    rounds: int,
    batch: int,
    keep: Path | None,
    cprofile: Path | None = None,
) -> int:
    """One listener run under valgrind (its instruction count), or natively under cProfile."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    with tempfile.TemporaryDirectory(prefix="spop-listen-instr-") as tmp:
        env["SPOP_DIAG_DIR"] = os.path.join(tmp, "diag")
        hub = subprocess.Popen(
            [sys.executable, __file__, "--hub", f"{listeners},{rounds},{batch}"],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            assert hub.stdout is not None
            port = int(hub.stdout.readline())
            config = Path(tmp) / "listen.toml"
            lines = ["[server]", f'address = "{port}@127.0.0.1"', ""]
            for i in range(listeners):
                lines += [
                    "[[listeners]]",
                    'media = "telephone"',
                    f'resource = "{resource_name(i)}"',
                    "",
                ]
            config.write_text("\n".join(lines))
            out_file = Path(tmp) / "cg.out"
            stdout_path = Path(tmp) / "stdout"
            with open(stdout_path, "wb") as stdout, open(Path(tmp) / "stderr", "wb") as stderr:
                wrapper = (
                    [sys.executable, "-m", "cProfile", "-o", str(cprofile)]
                    if cprofile is not None
                    else [
                        "valgrind",
                        "--tool=callgrind",
                        f"--callgrind-out-file={out_file}",
                        sys.executable,
                    ]
                )
                listen = subprocess.Popen(
                    [*wrapper, "-m", "spop_cli", "listen", "--config", str(config), "--json"],
                    stdout=stdout, stderr=stderr, env=env,
                )  # fmt: skip
                for expect in ("registered", "acked"):
                    line = hub.stdout.readline()
                    if not line.startswith(expect):
                        listen.kill()
                        raise SystemExit(f"the minimal hub said {line!r}, not {expect!r}")
                listen.send_signal(signal.SIGTERM)
                listen.wait(1800)
            err = (Path(tmp) / "stderr").read_text(errors="replace")
            printed = [line for line in stdout_path.read_bytes().splitlines() if line]
            if len(printed) != rounds * batch or len({p[:40] for p in printed}) != len(printed):
                raise SystemExit(
                    f"{len(printed)} lines printed for {rounds * batch} pops:\n{err[-2000:]}"
                )
            if cprofile is not None:
                return 0
            total = callgrind_total(err)
            if keep is not None:
                shutil.copy(out_file, keep / f"callgrind.{rounds}rounds.out")
            return total
        finally:
            hub.kill()
            hub.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", help="a source tree to run instead of the installed spop_cli")
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument("--rounds", default="5,20", help="two round counts")
    parser.add_argument("--batch", type=int, default=100, help="pops per round")
    parser.add_argument("--profile", metavar="DIR", help="keep the callgrind files in DIR")
    parser.add_argument(
        "--cprofile",
        metavar="FILE",
        help="instead: one native run (the high round count) under cProfile into FILE",
    )
    parser.add_argument("--hub", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hub:
        listeners, rounds, batch = (int(x) for x in args.hub.split(","))
        asyncio.run(_hub(listeners, rounds, batch))
        return
    keep = Path(args.profile) if args.profile else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    low, high = (int(x) for x in args.rounds.split(","))
    if args.cprofile:
        _run(args.src, args.listeners, high, args.batch, None, Path(args.cprofile).resolve())
        print(f"cProfile of {high} rounds of {args.batch} pops in {args.cprofile}")
        return
    started = time.monotonic()
    a = _run(args.src, args.listeners, low, args.batch, keep)
    b = _run(args.src, args.listeners, high, args.batch, keep)
    per_pop = (b - a) / ((high - low) * args.batch)
    print(
        f"{per_pop:,.0f} instructions per pop in `spop listen --json` ({args.listeners:,} listeners; "
        f"{low} and {high} rounds of {args.batch} pops; {time.monotonic() - started:.0f} s under valgrind)"
    )


if __name__ == "__main__":
    main()
