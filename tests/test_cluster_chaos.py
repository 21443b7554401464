"""Several hubs on a three-node NATS JetStream cluster, broken for real: SIGKILL a hub, SIGKILL a
NATS node, while 1,000 listeners receive a stream of pops. Every pop is counted.

Marked `chaos` (run by `pytest -m chaos` and .ci/run)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hubproc import HubProcess, ListenerProcess, pop, run
from natsproc import NatsCluster
from spop_cli import client
from spop_cli.model import ScreenPopError

pytestmark = pytest.mark.chaos

LISTENERS = 1000
INTERVAL = 3.0  # the listeners' reconnecting interval


def start_hubs(tmp: Path, cluster: NatsCluster, count: int = 3) -> list[HubProcess]:
    """`count` `spop serve` processes with backend = "nats", replicas 3; hub i lists the NATS
    nodes starting at node i, so each talks to a different one."""
    hubs = []
    urls = [node.url for node in cluster.nodes]
    for i in range(count):
        work = tmp / f"hub{i}"
        work.mkdir(parents=True)
        servers = ",".join(urls[i:] + urls[:i])
        config = work / "config.toml"
        config.write_text(
            f'[hub]\nbackend = "nats"\nnats_servers = "{servers}"\nnats_replicas = 3\n'
        )
        hubs.append(
            HubProcess(work, journal=False, heartbeat=1.0, env={"SPOP_CONFIG": str(config)}).start(
                60
            )
        )
    return hubs


class Publisher:
    """A source that resends a batch (same ids) to the next hub until one answers `ok`."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.accepted: list[str] = []
        self.resends = 0
        self.link: client.HubLink | None = None
        self.turn = 0

    async def send(self, batch: list[dict[str, Any]]) -> None:
        while True:
            try:
                if self.link is None or self.link.lost:
                    address = self.addresses[self.turn % len(self.addresses)]
                    self.link = await client.connect(address, role="source", timeout=2)
                answer = await self.link.request("publish", pops=batch, timeout=10)
                self.accepted += answer["ids"]
                return
            except ScreenPopError:
                self.resends += 1
                self.turn += 1
                if self.link is not None:
                    self.link.close()
                self.link = None
                await asyncio.sleep(0.05)

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


def stream_pops(addresses: list[str], total: int, break_it: Any, at: int) -> list[str]:
    """`total` pops in batches of 10 to agents 0..999, ~1,000/s; `break_it()` once `at` are in."""

    async def body() -> list[str]:
        publisher = Publisher(addresses)
        broken = False
        for start in range(0, total, 10):
            batch = [
                pop(f"agent-{i % LISTENERS}", id=f"pop-{i}", source=str(i))
                for i in range(start, start + 10)
            ]
            await publisher.send(batch)
            if not broken and start >= at:
                broken = True
                await asyncio.to_thread(break_it)
            await asyncio.sleep(0.01)
        publisher.close()
        return publisher.accepted

    return run(body(), timeout=300)


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def check_all_delivered(desks: ListenerProcess, total: int) -> None:
    assert desks.wait(lambda s: s["pops"] == total, 120), (desks.state["pops"], total)
    assert desks.state["twice"] == 0
    assert desks.state["calls"] == total
    assert desks.wait(lambda s: s["up"] == LISTENERS, 30), desks.state["up"]


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    nodes = NatsCluster(tmp_path / "nats", 3)
    yield nodes
    nodes.close()


def test_sigkill_a_hub_under_1000_listeners(tmp_path: Path, cluster: NatsCluster) -> None:
    hubs = start_hubs(tmp_path, cluster)
    address = ",".join(hub.address for hub in hubs)
    desks = ListenerProcess(tmp_path / "desks", address, "agent-", LISTENERS, INTERVAL)
    try:
        assert desks.wait(lambda s: s["up"] == LISTENERS, 180), desks.state
        victim = hubs[0]
        on_victim = LISTENERS // 3 + (1 if LISTENERS % 3 else 0)  # listener i starts at hub i % 3
        moved: list[float] = []

        def kill() -> None:
            victim.kill()
            killed = time.monotonic()

            def watch() -> None:  # every listener of the victim Up again on another hub
                if desks.wait(lambda s: s["losses"] >= on_victim and s["up"] == LISTENERS, 60):
                    moved.append(time.monotonic() - killed)

            threading.Thread(target=watch, daemon=True).start()

        total = 4000
        survivors = [hub.address for hub in hubs[1:]]
        accepted = stream_pops([hubs[0].address, *survivors], total, kill, at=1500)
        assert sorted(accepted) == sorted({f"pop-{i}" for i in range(total)})
        # the third of the listeners on the killed hub lost it, and are back Up on another
        assert desks.wait(lambda s: s["losses"] == on_victim, 30), desks.state["losses"]
        check_all_delivered(desks, total)
        assert wait_until(lambda: bool(moved), 60)
        # the bound: back Up on another hub within two reconnecting intervals
        assert moved[0] < 2 * INTERVAL, moved[0]
        print(f"\nhub SIGKILLed: {on_victim} listeners Up on another hub after {moved[0]:.2f} s")
    finally:
        desks.stop()
        for hub in hubs:
            hub.kill()


def test_sigkill_a_nats_node_under_1000_listeners(tmp_path: Path, cluster: NatsCluster) -> None:
    hubs = start_hubs(tmp_path, cluster)
    address = ",".join(hub.address for hub in hubs)
    desks = ListenerProcess(tmp_path / "desks", address, "agent-", LISTENERS, INTERVAL)
    try:
        assert desks.wait(lambda s: s["up"] == LISTENERS, 180), desks.state
        total = 4000
        accepted = stream_pops([hub.address for hub in hubs], total, cluster.nodes[0].kill, at=1500)
        assert sorted(accepted) == sorted({f"pop-{i}" for i in range(total)})
        check_all_delivered(desks, total)
        assert desks.state["losses"] == 0  # the hubs stayed up: no listener noticed
    finally:
        desks.stop()
        for hub in hubs:
            hub.kill()


def test_contacts_alternating_between_three_hubs_on_three_replicas(
    tmp_path: Path, cluster: NatsCluster
) -> None:
    """Every scenario, its events sent to hub A, B, C, A, … (each hub on a different NATS node,
    contact state replicated 3 times): the pops one embedded hub gives."""
    from datetime import UTC, datetime

    from conftest import HubThread
    from spop_cli.scenario import builtin_names, load_scenario, timeline
    from test_cluster import play_alternating

    start = datetime(2024, 5, 14, 9, 0, 0, tzinfo=UTC)
    urls = [node.url for node in cluster.nodes]
    embedded = HubThread()
    hubs = [
        HubThread(backend="nats", nats_servers=",".join(urls[i:] + urls[:i]), nats_replicas=3)
        for i in range(3)
    ]
    try:
        for name in builtin_names():
            events = timeline(load_scenario(name), start, contact_suffix="-" + name)
            alone = play_alternating([embedded], events)
            assert play_alternating(hubs, events) == alone, name
    finally:
        embedded.close()
        for hub in hubs:
            hub.close()
