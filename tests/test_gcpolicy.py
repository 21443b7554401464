"""The hub keeps its connections out of full garbage collections (hub/gcpolicy.py), and what a
closed connection leaves behind is still reclaimed: real hub, real client connections."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import pytest

from hubproc import loops, on
from spop_cli import client
from spop_cli.hub.connection import HubConnection
from spop_cli.hub.gcpolicy import FreezeOnGrowth
from spop_cli.hub.server import Hub, HubConfig


async def until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def thawed() -> Any:
    yield
    gc.unfreeze()  # what the test froze goes back to the ordinary generations


def test_freezes_only_at_a_new_high_of_at_least_min_step_connections() -> None:
    gc.unfreeze()  # whatever an earlier test of this process froze (serve freezes at start)
    policy = FreezeOnGrowth(min_step=10, growth=1.1)
    policy.tick(9)  # just under the step
    assert (policy.freezes, gc.get_freeze_count()) == (0, 0)
    policy.tick(10)  # at the step
    assert (policy.freezes, policy.frozen_at, gc.get_freeze_count() > 0) == (1, 10, True)
    policy.tick(19)  # not 10 more
    assert policy.freezes == 1
    policy.tick(20)
    assert (policy.freezes, policy.frozen_at) == (2, 20)
    policy.tick(10)  # half of 20 still alive: no thaw yet
    assert policy.thaws == 0
    policy.tick(9)  # under half
    assert (policy.thaws, policy.frozen_at) == (1, 9)


@pytest.mark.parametrize("runner", loops())
def test_closed_connections_are_reclaimed_after_a_freeze(runner: Callable[..., Any]) -> None:
    async def scenario() -> tuple[int, int, int]:
        # heartbeat 0.2 s: the housekeeping checks the connections in slices of a snapshot it
        # renews every 0.1 s (max(0.05, heartbeat / 2)), and until then the snapshot holds them
        hub = Hub(HubConfig(host="127.0.0.1", port=0, http_port=0, heartbeat=0.2))
        await hub.start()
        links = []
        try:
            for i in range(20):
                link = await client.connect(f"{hub.port}@127.0.0.1")
                await link.request("register", media="telephone", resource=str(1000 + i))
                links.append(link)
            await until(lambda: len(hub.connections) == 20)
            policy = FreezeOnGrowth(min_step=10)
            policy.tick(len(hub.connections))
            frozen = gc.get_freeze_count()
            for link in links[:15]:
                link.close()
            await until(lambda: len(hub.connections) == 5)
            await asyncio.sleep(0.3)  # past the housekeeping's round that may still hold them
            policy.tick(len(hub.connections))  # 5 < 20 // 2: thaw, collect, freeze again
            gc.unfreeze()  # to count: frozen objects are not listed
            alive = sum(isinstance(o, HubConnection) for o in gc.get_objects())
            return frozen, policy.thaws, alive
        finally:
            for link in links:
                link.close()
            await hub.stop()

    frozen, thaws, alive = on(runner, scenario())
    assert frozen > 0
    assert thaws == 1
    assert alive == 5  # the 15 closed ones are freed although frozen (no cycle keeps them)
