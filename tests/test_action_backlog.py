"""An action far behind its pops: past MAX_QUEUED waiting for one action (or the plugin hooks),
`spop listen` holds their acks until the queue is back within it, so the hub's window paces the
desktop. An outside check found the pops past 10,000 failed at the action and acked all the same:
20,000 pops of a backlog, 10,000 handled, none left pending in the hub."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from hubproc import address_of, inprocess_hub, loops, on, pop, run, until
from spop_cli import LinkPool, hookimpl
from spop_cli.dispatch import MAX_QUEUED, ActionDispatcher
from spop_cli.listener.core import AsyncListener
from spop_cli.plugins import build_plugin_manager
from spop_cli.session import ListenerPlan, ListenSession

WINDOW = 1000  # the hub's default max_inflight


class Gate:
    """An async action that records each pop once its gate is open."""

    def __init__(self, name: str = "gate") -> None:
        self.name = name
        self.open = asyncio.Event()
        self.ran: list[str] = []

    async def run(self, pop: Any) -> None:
        await self.open.wait()
        self.ran.append(pop.id)


def pops(count: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=f"p{i:05d}") for i in range(count)]


def test_max_queued_waiting_are_acked_at_once_the_next_is_held_until_there_is_room() -> None:
    async def body() -> None:
        gate = Gate()
        dispatcher = ActionDispatcher([gate])
        held = [dispatcher.submit(p) for p in pops(MAX_QUEUED + 2)]
        assert held[:MAX_QUEUED] == [None] * MAX_QUEUED  # the 10,000th waiting: no hold
        first, second = held[MAX_QUEUED:]
        assert first is not None and second is not None
        # the worker takes p00000 (it waits at the gate): 10,001 waiting, one over the limit
        assert await until(lambda: first.done())
        await asyncio.sleep(0.05)
        assert not second.done()
        gate.open.set()
        assert await until(lambda: second.done())
        assert await dispatcher.drain(10)
        assert gate.ran == [p.id for p in pops(MAX_QUEUED + 2)]
        assert dispatcher.failures == 0
        dispatcher.close()

    run(body())


def test_a_pop_held_by_two_actions_is_let_go_when_both_have_room() -> None:
    async def body() -> None:
        crm, log = Gate("crm"), Gate("log")
        dispatcher = ActionDispatcher([crm, log])
        held = [dispatcher.submit(p) for p in pops(MAX_QUEUED + 2)]
        both = held[-1]
        assert both is not None and held[-2] is not None
        await asyncio.sleep(0.05)  # each worker took p00000: each queue one over
        assert not both.done()
        crm.open.set()  # crm's queue empties; log's stays one over
        assert await until(lambda: len(crm.ran) == MAX_QUEUED + 2)
        assert not both.done()
        log.open.set()
        assert await until(lambda: both.done())
        assert await dispatcher.drain(10)
        dispatcher.close()

    run(body())


def test_the_hooks_queue_holds_too_and_drops_no_call() -> None:
    seen: list[str] = []
    gate = threading.Event()

    class Watcher:
        @hookimpl
        def spop_screen_pop(self, pop: Any, listener: Any) -> None:
            gate.wait(10)
            seen.append(pop.id)

    async def body() -> None:
        pm = build_plugin_manager(entry_points=False)
        pm.register(Watcher(), name="watcher")
        dispatcher = ActionDispatcher([], plugin_manager=pm)
        held = [dispatcher.submit(p) for p in pops(MAX_QUEUED + 2)]
        assert held[:MAX_QUEUED] == [None] * MAX_QUEUED
        last = held[-1]
        assert last is not None
        await asyncio.sleep(0.05)
        assert not last.done()
        gate.set()
        assert await until(lambda: last.done(), timeout=30)
        assert await dispatcher.drain(30)
        dispatcher.close()

    run(body(), timeout=60)
    assert seen == [p.id for p in pops(MAX_QUEUED + 2)]


def test_release_held_lets_every_held_pop_go_for_a_listener_about_to_stop() -> None:
    async def body() -> None:
        gate = Gate()
        dispatcher = ActionDispatcher([gate])
        held = [f for f in (dispatcher.submit(p) for p in pops(MAX_QUEUED + 5)) if f]
        assert len(held) == 5
        dispatcher.release_held()
        await asyncio.sleep(0)
        assert all(f.done() for f in held)
        gate.open.set()
        assert await dispatcher.drain(10)  # queued: they still run
        assert len(gate.ran) == MAX_QUEUED + 5
        dispatcher.close()

    run(body())


@pytest.mark.parametrize("runner", loops())
def test_a_backlog_past_max_queued_is_paced_by_the_hub_and_handled_once_each(runner: Any) -> None:
    """`spop listen`'s session against a real hub: with the action stuck, the hub holds exactly
    what is past MAX_QUEUED waiting (plus the one running) and sends no more than its window;
    once the action moves, every pop runs once, in order, and the hub holds none."""
    total = MAX_QUEUED + 1500

    async def body() -> None:
        async with inprocess_hub() as hub:
            gate = Gate()
            session = ListenSession(
                [ListenerPlan("telephone", "1001", [gate])], address=address_of(hub), count=total
            )
            await session.start()
            try:
                ids: list[str] = []
                for start in range(0, total, 500):
                    ids += await hub.publish(
                        [pop("1001", id=f"b{i:05d}") for i in range(start, start + 500)]
                    )
                accepted = MAX_QUEUED + 1  # waiting, and the one at the gate

                def settled() -> bool:
                    counters = hub.status()["counters"]
                    return counters["acked"] == accepted and counters["delivered"] == (
                        accepted + WINDOW
                    )

                assert await until(settled, timeout=30)
                await asyncio.sleep(0.3)  # and no more: the window is full of held pops
                status = hub.status()
                assert status["counters"]["acked"] == accepted
                assert status["counters"]["delivered"] == accepted + WINDOW
                assert status["pending"] == total - accepted
                gate.open.set()
                assert await session.wait(timeout=60) == "count"
            finally:
                assert await session.finish(30)
            assert gate.ran == ids
            status = hub.status()
            assert status["pending"] == 0
            assert status["counters"]["acked"] == total
            assert status["counters"].get("unknown_acks", 0) == 0  # listed once not 0

    on(runner, body(), timeout=120)


@pytest.mark.parametrize("runner", loops())
def test_acks_made_just_before_stop_listening_leave_before_the_unregister(runner: Any) -> None:
    """On a shared connection acks leave at the end of the loop turn; an `unregister` sent in
    that turn went first, and the hub (which takes acks only from a registered key) kept the
    pops to send again."""

    async def body() -> None:
        async with inprocess_hub() as hub:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            listener = AsyncListener("telephone", pool=LinkPool())
            listener.on_screen_pop(lambda event: done)  # handled once `done` completes
            await listener.initialize(address_of(hub))
            await listener.start_listening("1001")
            await hub.publish(pop("1001", id="late"))
            assert await until(lambda: listener.pops_received == 1)
            done.set_result(None)
            await asyncio.sleep(0)  # its ack is made, queued for the end of the turn
            await listener.stop_listening()
            assert await until(lambda: hub.status()["counters"]["acked"] == 1)
            status = hub.status()
            assert status["pending"] == 0
            assert status["counters"].get("unknown_acks", 0) == 0  # listed once not 0
            await listener.shutdown()

    on(runner, body())
