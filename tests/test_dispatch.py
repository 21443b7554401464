"""The dispatcher: a failing, slow or hanging action delays nobody; every outcome is reported."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from spop_cli.actions import ActionSkipped, ConfiguredAction
from spop_cli.dispatch import FAILED, OK, SKIPPED, ActionDispatcher, Outcome
from spop_cli.hookspecs import hookimpl
from spop_cli.model import Media, ScreenPopTelephoneEvent
from spop_cli.plugins import build_plugin_manager
from spop_cli.templates import parse_condition


def run(coro: Any, timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def pop(n: int = 0, **fields: Any) -> ScreenPopTelephoneEvent:
    return ScreenPopTelephoneEvent(
        media=Media.telephone, resource="13579", source=f"src{n}", **fields
    )


class Recorder:
    """A sync action that records what it ran and when."""

    def __init__(self, name: str = "recorder") -> None:
        self.name = name
        self.ran: list[tuple[str, float]] = []

    def run(self, event: Any) -> None:
        self.ran.append((event.source, time.monotonic()))


class Hanging:
    """Never returns by itself (until released), like a stuck HTTP call."""

    def __init__(self, name: str = "hanging", timeout: float = 0.4) -> None:
        self.name = name
        self.timeout = timeout
        self.release = threading.Event()

    def run(self, event: Any) -> None:
        self.release.wait(30)


class AsyncHanging:
    name = "async-hanging"
    timeout = 0.4

    async def run(self, event: Any) -> None:
        await asyncio.sleep(30)


class Failing:
    name = "failing"

    def run(self, event: Any) -> None:
        raise RuntimeError("CRM is down")


class Results(list):
    def __call__(self, name: str, event: Any, outcome: Outcome) -> None:
        self.append((name, event.source, outcome, time.monotonic()))

    def of(self, name: str) -> list[Outcome]:
        return [outcome for n, _, outcome, _ in self if n == name]


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("stuck", [Hanging, AsyncHanging])
def test_a_hanging_action_does_not_delay_another(stuck: type) -> None:
    async def scenario() -> None:
        results = Results()
        hanging, quick = stuck(), Recorder("quick")
        dispatcher = ActionDispatcher([hanging, quick], logging.getLogger("test"), results)
        started = time.monotonic()
        for n in range(3):
            dispatcher.submit(pop(n))
        await until(lambda: len(quick.ran) == 3)
        assert quick.ran[-1][1] - started < 0.3  # all three, long before the hanging one's timeout
        assert await dispatcher.drain(10)
        failed = results.of(hanging.name)
        assert [o.status for o in failed] == [FAILED] * 3
        assert failed[0].error == "timed out after 0.4 s"
        assert dispatcher.failures == 3
        assert [o.status for o in results.of("quick")] == [OK] * 3
        if isinstance(hanging, Hanging):
            hanging.release.set()
        dispatcher.close()

    run(scenario())


def test_a_hanging_action_does_not_delay_another_listener() -> None:
    async def scenario() -> None:
        hanging, other = Hanging(timeout=5), Recorder("other")
        first = ActionDispatcher([hanging], logging.getLogger("test"))
        second = ActionDispatcher([other], logging.getLogger("test"))
        first.submit(pop(1))
        started = time.monotonic()
        second.submit(pop(2))
        await until(lambda: other.ran)
        assert other.ran[0][1] - started < 0.3
        hanging.release.set()
        assert await first.drain(5)
        first.close()
        second.close()

    run(scenario())


def test_failure_is_reported_logged_and_counted(caplog) -> None:
    async def scenario() -> Results:
        results = Results()
        dispatcher = ActionDispatcher(
            [Failing(), Recorder()], logging.getLogger("spop.listener"), results
        )
        dispatcher.submit(pop(7))
        assert await dispatcher.drain(5)
        assert dispatcher.failures == 1
        assert dispatcher.counts == {FAILED: 1, OK: 1}
        dispatcher.close()
        return results

    with caplog.at_level(logging.INFO, logger="spop.listener"):
        results = run(scenario())
    (failed,) = results.of("failing")
    assert failed.status == FAILED
    assert failed.error == "RuntimeError: CRM is down"
    assert failed.duration >= 0
    assert "action failing (failing) failed for pop" in caplog.text
    assert "CRM is down" in caplog.text
    assert "action recorder ok for pop" in caplog.text


def test_one_action_runs_pops_in_order() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        dispatcher = ActionDispatcher([recorder])
        for n in range(20):
            dispatcher.submit(pop(n))
        assert await dispatcher.drain(5)
        assert [source for source, _ in recorder.ran] == [f"src{n}" for n in range(20)]
        dispatcher.close()

    run(scenario())


def test_when_and_action_skipped_are_skips() -> None:
    class Skipper:
        name = "skipper"

        def run(self, event: Any) -> None:
            raise ActionSkipped("notify-send not found")

    async def scenario() -> Results:
        results = Results()
        filtered = ConfiguredAction(
            "crm", "recorder", Recorder(), parse_condition({"queue_name": "Ventes*"}), 5.0
        )
        dispatcher = ActionDispatcher([filtered, Skipper()], on_result=results)
        dispatcher.submit(pop(1, queue_name="Support"))
        dispatcher.submit(pop(2, queue_name="Ventes Paris"))
        assert await dispatcher.drain(5)
        assert dispatcher.failures == 0
        dispatcher.close()
        return results

    results = run(scenario())
    assert [(o.status, o.error) for o in results.of("crm")] == [
        (SKIPPED, "when: queue_name 'Support' does not match 'Ventes*'"),
        (OK, ""),
    ]
    assert [o.error for o in results.of("skipper")] == ["notify-send not found"] * 2


def test_a_timeout_inside_the_action_is_not_reported_as_ours() -> None:
    class SocketTimeout:
        name = "socket"

        def run(self, event: Any) -> None:
            raise TimeoutError("read timed out")

    async def scenario() -> Results:
        results = Results()
        dispatcher = ActionDispatcher([SocketTimeout()], on_result=results)
        dispatcher.submit(pop())
        await dispatcher.drain(5)
        dispatcher.close()
        return results

    (outcome,) = run(scenario()).of("socket")
    assert outcome.error == "TimeoutError: read timed out"


def test_drain_gives_up_after_its_timeout() -> None:
    async def scenario() -> None:
        hanging = Hanging(timeout=10)
        dispatcher = ActionDispatcher([hanging])
        dispatcher.submit(pop())
        started = time.monotonic()
        assert await dispatcher.drain(0.2) is False
        assert time.monotonic() - started < 1
        assert dispatcher.pending == 1
        hanging.release.set()
        assert await dispatcher.drain(5) is True
        assert dispatcher.pending == 0
        dispatcher.close()

    run(scenario())


def test_close_closes_the_actions_and_refuses_more() -> None:
    class Closable(Recorder):
        closed = False

        def close(self) -> None:
            self.closed = True

    async def scenario() -> None:
        action = Closable()
        dispatcher = ActionDispatcher([action])
        dispatcher.submit(pop())
        await dispatcher.drain(5)
        dispatcher.close()
        assert action.closed
        with pytest.raises(RuntimeError):
            dispatcher.submit(pop())

    run(scenario())


class SeesEverything:
    """A plugin with no action: it watches every pop and status change."""

    def __init__(self) -> None:
        self.pops: list[tuple[str, Any]] = []
        self.changes: list[tuple[Any, Any, Any]] = []

    @hookimpl
    def spop_screen_pop(self, pop: Any, listener: Any) -> None:
        self.pops.append((pop.source, listener))

    @hookimpl
    def spop_status_changed(self, listener: Any, old: Any, new: Any) -> None:
        self.changes.append((listener, old, new))


class Broken:
    @hookimpl
    def spop_screen_pop(self, pop: Any, listener: Any) -> None:
        raise ValueError("plugin bug")


def test_hooks_see_every_pop_and_status_change(caplog) -> None:
    pm = build_plugin_manager(entry_points=False)
    watcher = SeesEverything()
    pm.add_plugin(watcher, "watcher", "test")
    pm.add_plugin(Broken(), "broken", "test")

    async def scenario() -> Recorder:
        recorder = Recorder()
        dispatcher = ActionDispatcher(
            [recorder], logging.getLogger("spop.listener"), plugin_manager=pm
        )
        dispatcher.submit(pop(1), "listener-a")
        dispatcher.submit(pop(2), "listener-a")
        dispatcher.status_changed("listener-a", "Status_Idle", "Status_Up")
        assert await dispatcher.drain(5)
        dispatcher.close()
        return recorder

    with caplog.at_level(logging.INFO, logger="spop.listener"):
        recorder = run(scenario())
    assert watcher.pops == [("src1", "listener-a"), ("src2", "listener-a")]
    assert watcher.changes == [("listener-a", "Status_Idle", "Status_Up")]
    assert len(recorder.ran) == 2  # a broken plugin does not stop the actions
    assert "hook spop_screen_pop of broken failed: ValueError: plugin bug" in caplog.text


class Threads:
    """A sync action that records the thread of each run; `hang_on` names a pop it hangs on
    until released."""

    name = "threads"
    timeout = 0.5

    def __init__(self, hang_on: str | None = None) -> None:
        self.hang_on = hang_on
        self.release = threading.Event()
        self.ran: list[tuple[str, int]] = []

    def run(self, event: Any) -> None:
        self.ran.append((event.source, threading.get_ident()))
        if event.source == self.hang_on:
            self.release.wait(30)


def test_a_queues_sync_runs_share_one_thread_that_ends_at_close() -> None:
    """One daemon thread per action queue, kept from pop to pop (not one started per pop)."""

    async def scenario() -> None:
        action = Threads()
        dispatcher = ActionDispatcher([action], logging.getLogger("test"))
        for n in range(5):
            dispatcher.submit(pop(n))
        assert await dispatcher.drain(10)
        threads = {ident for _, ident in action.ran}
        assert [source for source, _ in action.ran] == [f"src{n}" for n in range(5)]
        assert len(threads) == 1 and threading.get_ident() not in threads
        (worker,) = [t for t in threading.enumerate() if t.ident in threads]
        assert worker.daemon and worker.name == "spop-threads"
        dispatcher.close()
        await asyncio.to_thread(worker.join, 5)
        assert not worker.is_alive()

    run(scenario())


def test_a_run_past_its_time_keeps_its_thread_and_the_next_run_gets_a_new_one() -> None:
    async def scenario() -> None:
        results = Results()
        action = Threads(hang_on="src1")
        dispatcher = ActionDispatcher([action], logging.getLogger("test"), results)
        for n in range(4):
            dispatcher.submit(pop(n))
        assert await dispatcher.drain(10)
        assert [o.status for o in results.of("threads")] == [OK, FAILED, OK, OK]
        assert results.of("threads")[1].error == "timed out after 0.5 s"
        idents = [ident for _, ident in action.ran]
        assert idents[0] == idents[1]  # the hung run is on the queue's thread...
        assert idents[2] == idents[3] != idents[1]  # ...and the runs after it on a new one
        stuck = next(t for t in threading.enumerate() if t.ident == idents[1])
        assert stuck.is_alive()  # left to finish alone
        action.release.set()
        await asyncio.to_thread(stuck.join, 5)
        assert not stuck.is_alive()  # it ended once its run returned
        dispatcher.close()

    run(scenario())


class HookThreads:
    """A plugin that records the thread of each `spop_screen_pop` call; `hang_on` names a pop
    it hangs on until released."""

    def __init__(self, hang_on: str | None = None) -> None:
        self.hang_on = hang_on
        self.release = threading.Event()
        self.ran: list[tuple[str, int]] = []

    @hookimpl
    def spop_screen_pop(self, pop: Any, listener: Any) -> None:
        self.ran.append((pop.source, threading.get_ident()))
        if pop.source == self.hang_on:
            self.release.wait(30)


def test_hook_calls_share_one_thread_and_one_past_its_time_leaves_it_to_a_new_one(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plugin hooks run on one kept daemon thread (not one started per call); a call past
    HOOK_TIMEOUT keeps that thread, left to finish alone, and the calls after it get a new one."""
    monkeypatch.setattr("spop_cli.dispatch.HOOK_TIMEOUT", 0.2)
    pm = build_plugin_manager(entry_points=False)
    plugin = HookThreads(hang_on="src2")
    pm.add_plugin(plugin, "threads", "test")

    async def scenario() -> None:
        dispatcher = ActionDispatcher([], logging.getLogger("spop.listener"), plugin_manager=pm)
        for n in range(5):
            dispatcher.submit(pop(n))
        assert await dispatcher.drain(10)
        assert [source for source, _ in plugin.ran] == [f"src{n}" for n in range(5)]
        idents = [ident for _, ident in plugin.ran]
        assert idents[0] == idents[1] == idents[2] != threading.get_ident()  # one kept thread
        assert idents[3] == idents[4] != idents[2]  # the calls after the hung one: a new one
        stuck = next(t for t in threading.enumerate() if t.ident == idents[2])
        assert stuck.daemon and stuck.name == "spop-hooks"
        assert stuck.is_alive()  # left to finish alone
        plugin.release.set()
        await asyncio.to_thread(stuck.join, 5)
        assert not stuck.is_alive()  # it ended once its call returned
        (worker,) = [t for t in threading.enumerate() if t.ident == idents[3]]
        dispatcher.close()
        await asyncio.to_thread(worker.join, 5)
        assert not worker.is_alive()  # and the kept thread ends at close

    with caplog.at_level(logging.ERROR, logger="spop.listener"):
        run(scenario())
    assert "hook spop_screen_pop of threads timed out after 0.2 s" in caplog.text
