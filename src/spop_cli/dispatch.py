"""Runs a listener's actions for each pop, each action on its own queue and worker.

A failing, slow or hanging action delays nobody: every action has its own asyncio queue, a sync
`run` goes to a daemon thread of that queue's own (a hung one cannot hold the process at exit, as a
thread-pool worker would), and each run has a time limit: a run past it keeps its thread, left to
finish alone, and the next run gets a new one. Results go to `on_result` and to the
diagnostics logger; plugin hooks (`spop_screen_pop`, `spop_status_changed`) run on a worker too,
their calls on one kept daemon thread in the same way.

No pop is turned away. Past MAX_QUEUED waiting for one action (or hook), `submit` returns a
future that completes once the queue is back within it: the listener acks the pop then, so the
hub's window of unacked pops (`max_inflight`) paces a desktop whose action falls behind, and the
pops over the limit stay pending in the hub, not acked and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .actions import DEFAULT_TIMEOUT, ActionError, ActionSkipped, ConfiguredAction
from .diagnostics import log_line

MAX_QUEUED = 10_000  # pops waiting for one action (or hook) past which their acks wait for room
HOOK_TIMEOUT = 30.0

OK, FAILED, SKIPPED = "ok", "failed", "skipped"


@dataclass(frozen=True)
class Outcome:
    """What happened to one pop in one action."""

    status: str  # "ok", "failed" or "skipped"
    duration: float = 0.0  # seconds spent in run()
    error: str = ""  # why it failed or was skipped


class _Slot:
    """One action's queue and worker."""

    def __init__(self, action: ConfiguredAction) -> None:
        self.action = action
        self.queue: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.runner = ThreadRunner(action.name)
        self.held: deque[_Hold] = deque()


class _Hold:
    """One pop's ack, held while it is past MAX_QUEUED in `count` queues (actions, hooks)."""

    __slots__ = ("future", "count")

    def __init__(self, future: asyncio.Future[None], count: int) -> None:
        self.future, self.count = future, count


def _release(held: deque[_Hold], queued: int) -> None:
    """After a get: the oldest held go, but for the `queued - MAX_QUEUED` the queue is still
    over the limit (a pop held in several queues goes once all let it go)."""
    while len(held) > max(queued - MAX_QUEUED, 0):
        hold = held.popleft()
        hold.count -= 1
        if hold.count == 0 and not hold.future.done():
            hold.future.set_result(None)


class ActionDispatcher:
    """`submit(pop, listener)` queues the pop for every action and returns at once."""

    def __init__(
        self,
        actions: Iterable[ConfiguredAction | Any],
        logger: logging.Logger | None = None,
        on_result: Callable[[str, Any, Outcome], Any] | None = None,
        *,
        plugin_manager: Any = None,
    ) -> None:
        self.actions = [_configured(action) for action in actions]
        self.log = logger or logging.getLogger("spop.listener")
        self.on_result = on_result
        self.plugin_manager = plugin_manager
        self.failures = 0
        self.pending = 0  # (pop, action) pairs queued or running
        self.counts: Counter[str] = Counter()
        self._slots = [_Slot(action) for action in self.actions]
        self._hooks: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._hooks_held: deque[_Hold] = deque()
        self._hook_worker: asyncio.Task[None] | None = None
        self._hook_runner = ThreadRunner("hooks")
        self._closed = False

    # -- in -------------------------------------------------------------------------------
    def submit(self, pop: Any, listener: Any = None) -> asyncio.Future[Any] | None:
        """Queue the pop for each action, then for the `spop_screen_pop` hook. Never blocks;
        None, or (a queue past MAX_QUEUED) a future to ack the pop after."""
        over = self._submit(pop, listener, "pop")
        if self._call_hook("spop_screen_pop", pop=pop, listener=listener):
            over.append(self._hooks_held)
        return self._hold(over) if over else None

    def submit_change(
        self, change: Any, pop: Any = None, listener: Any = None
    ) -> asyncio.Future[Any] | None:
        """Queue a contact change for the actions whose `on` names it (they get a
        `ChangeTrigger`: the change's fields over its pop's), then the `spop_contact_changed`
        hook. Never blocks; returns what `submit` does."""
        over = self._submit(ChangeTrigger(change, pop), listener, change.change)
        if self._call_hook("spop_contact_changed", change=change, listener=listener):
            over.append(self._hooks_held)
        return self._hold(over) if over else None

    def _submit(self, pop: Any, listener: Any, trigger: str) -> list[deque[_Hold]]:
        """Queue for each action it is for; the held lists of the queues now past MAX_QUEUED."""
        if self._closed:
            raise RuntimeError("dispatcher is closed")
        over = []
        for slot in self._slots:
            if trigger not in getattr(slot.action, "on", ("pop",)):
                continue
            self._start(slot)
            slot.queue.put_nowait((pop, listener))
            self.pending += 1
            if slot.queue.qsize() > MAX_QUEUED:
                over.append(slot.held)
        return over

    def _hold(self, over: list[deque[_Hold]]) -> asyncio.Future[None]:
        hold = _Hold(asyncio.get_running_loop().create_future(), len(over))
        for held in over:
            held.append(hold)
        return hold.future

    def release_held(self) -> None:
        """Let every held pop be acked now (a listener about to stop: they are queued, and
        the drain runs them; acked after it unregisters, the hub would keep them)."""
        for held in [slot.held for slot in self._slots] + [self._hooks_held]:
            _release(held, 0)

    @property
    def wants_changes(self) -> bool:
        """Some action runs on a change, or a plugin implements `spop_contact_changed`."""
        if any(set(a.on) - {"pop"} for a in self.actions):
            return True
        pm = self.plugin_manager
        return pm is not None and bool(pm.hook.spop_contact_changed.get_hookimpls())

    def status_changed(self, listener: Any, old: Any, new: Any) -> None:
        """Pass a listener's status change to the `spop_status_changed` hook."""
        self._call_hook("spop_status_changed", listener=listener, old=old, new=new)

    # -- out ------------------------------------------------------------------------------
    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued pop has been through every action (and hook); False on timeout."""
        waits = [slot.queue.join() for slot in self._slots]
        if self._hook_worker is not None:
            waits.append(self._hooks.join())
        if not waits:
            return True
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stop the workers and close the actions that hold files or sessions."""
        self._closed = True
        for task in [slot.worker for slot in self._slots] + [self._hook_worker]:
            if task is not None and not task.done():
                task.cancel()
        for slot in self._slots:
            slot.runner.close()
        self._hook_runner.close()
        for configured in self.actions:
            close = getattr(configured.action, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    self.log.exception("closing action %s failed", configured.name)

    # -- workers --------------------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        if slot.worker is None:
            slot.worker = asyncio.get_running_loop().create_task(
                self._work(slot), name=f"spop-action-{slot.action.name}"
            )

    async def _work(self, slot: _Slot) -> None:
        while True:
            pop, _listener = await slot.queue.get()
            if slot.held:
                _release(slot.held, slot.queue.qsize())
            try:
                outcome = await self._run(slot.action, pop, slot.runner)
                self._report(slot.action, pop, outcome)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in reporting must not stop the worker
                self.log.exception("action %s: reporting failed", slot.action.name)
            finally:
                self.pending -= 1
                slot.queue.task_done()

    async def _run(
        self, configured: ConfiguredAction, pop: Any, runner: ThreadRunner | None = None
    ) -> Outcome:
        if configured.when is not None:
            why = configured.when.mismatch(pop)
            if why is not None:
                return Outcome(SKIPPED, 0.0, f"when: {why}")
        run = configured.action.run
        deadline = asyncio.timeout(configured.timeout)
        started = time.monotonic()
        try:
            async with deadline:
                if inspect.iscoroutinefunction(run):
                    await run(pop)
                elif runner is not None:
                    result = await runner.run(run, pop)
                    if inspect.isawaitable(result):
                        await result
                else:
                    result = await run_in_thread(run, pop, name=configured.name)
                    if inspect.isawaitable(result):
                        await result
        except TimeoutError as exc:
            # Our deadline, or a timeout inside the action (a socket's, say): say which.
            if deadline.expired():
                if runner is not None:
                    runner.abandon()  # the run goes on alone in its thread; the next gets a new one
                error = f"timed out after {configured.timeout:g} s"
            else:
                error = _describe(exc)
            return Outcome(FAILED, time.monotonic() - started, error)
        except ActionSkipped as exc:
            return Outcome(SKIPPED, time.monotonic() - started, str(exc) or "skipped")
        except Exception as exc:
            return Outcome(FAILED, time.monotonic() - started, _describe(exc))
        return Outcome(OK, time.monotonic() - started)

    def _report(self, configured: ConfiguredAction, pop: Any, outcome: Outcome) -> None:
        self.counts[outcome.status] += 1
        pop_id = getattr(pop, "id", "?")
        if outcome.status == FAILED:
            self.failures += 1
            self.log.error(
                "action %s (%s) failed for pop %s after %.3f s: %s",
                configured.name,
                configured.type,
                pop_id,
                outcome.duration,
                outcome.error,
            )
        elif outcome.status == SKIPPED:
            self.log.info("action %s skipped pop %s: %s", configured.name, pop_id, outcome.error)
        else:
            log_line(
                self.log,
                logging.INFO,
                "action %s ok for pop %s in %.3f s",
                configured.name,
                pop_id,
                outcome.duration,
            )
        if self.on_result is not None:
            try:
                self.on_result(configured.name, pop, outcome)
            except Exception:
                self.log.exception("on_result callback failed")

    def _call_hook(self, hook_name: str, **kwargs: Any) -> bool:
        """Queue the hook call; True when the hooks' queue is now past MAX_QUEUED."""
        pm = self.plugin_manager
        if pm is None or self._closed or not getattr(pm.hook, hook_name).get_hookimpls():
            return False
        if self._hook_worker is None:
            self._hook_worker = asyncio.get_running_loop().create_task(
                self._work_hooks(), name="spop-hooks"
            )
        self._hooks.put_nowait((hook_name, kwargs))
        return self._hooks.qsize() > MAX_QUEUED

    async def _work_hooks(self) -> None:
        while True:
            hook_name, kwargs = await self._hooks.get()
            if self._hooks_held:
                _release(self._hooks_held, self._hooks.qsize())
            try:
                # One implementation at a time, so one broken plugin does not hide a pop from the rest.
                for impl in getattr(self.plugin_manager.hook, hook_name).get_hookimpls():
                    call = functools.partial(
                        impl.function, **{k: v for k, v in kwargs.items() if k in impl.argnames}
                    )
                    try:
                        await asyncio.wait_for(self._hook_runner.run(call), HOOK_TIMEOUT)
                    except TimeoutError:
                        self._hook_runner.abandon()  # it goes on alone; the next call gets a new thread
                        self.log.error(
                            "hook %s of %s timed out after %g s",
                            hook_name,
                            impl.plugin_name,
                            HOOK_TIMEOUT,
                        )
                    except Exception as exc:
                        self.log.error(
                            "hook %s of %s failed: %s", hook_name, impl.plugin_name, _describe(exc)
                        )
            finally:
                self._hooks.task_done()


class ChangeTrigger:
    """What an action gets for a contact change: the fields of the pop it follows (source,
    queue, contact data…) with the change's over them (`id`, `change`, `talk_time`…), so one
    template serves both. `trigger.change_event` is the ContactChange, `trigger.pop` the pop
    (None when this listener never got it: a `withdrawn`)."""

    __slots__ = ("change_event", "pop", "_fields")

    def __init__(self, change: Any, pop: Any = None) -> None:
        self.change_event = change
        self.pop = pop
        base = pop.to_dict() if pop is not None else {}
        self._fields = {**base, **change.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        return dict(self._fields)

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        key = "from" if name == "from_" else name
        if key in fields:
            return fields[key]
        raise AttributeError(name)


class ThreadRunner:
    """The daemon thread that runs one action queue's sync `run`s, one at a time, kept from pop
    to pop: a thread started per run cost more CPU than the built-in actions' own work. A run
    past its time limit keeps its thread (`abandon`), which ends once that run returns; the
    next run starts a new one, so a hung run never holds up the queue past its time limit."""

    __slots__ = ("name", "_jobs")

    def __init__(self, name: str = "action") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Any] | None = None

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue fn(*args) for the thread; the future gets its result or exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(
                target=_serve, args=(self._jobs,), name=f"spop-{self.name}", daemon=True
            ).start()
        self._jobs.put((loop, future, fn, args))
        return future

    def abandon(self) -> None:
        """Leave the thread to its current run; it ends after it. The next run gets a new one."""
        if self._jobs is not None:
            self._jobs.put(None)
            self._jobs = None

    close = abandon


def _serve(jobs: queue.SimpleQueue[Any]) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        _call(*job)
        del job  # hold no pop while waiting for the next


def _call(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], fn: Any, args: Any) -> None:
    """Run fn(*args) on this thread and hand the outcome to the future on its loop."""
    try:
        result, error = fn(*args), None
    except BaseException as exc:  # noqa: BLE001 - handed to the loop, not swallowed
        result, error = None, exc
    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting any more
        loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # timed out and cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def run_in_thread(fn: Callable[..., Any], *args: Any, name: str = "action") -> asyncio.Future[Any]:
    """Run fn(*args) in a new daemon thread; the future gets its result or exception."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    threading.Thread(
        target=_call, args=(loop, future, fn, args), name=f"spop-{name}", daemon=True
    ).start()
    return future


def _configured(action: ConfiguredAction | Any) -> ConfiguredAction:
    """Accept bare action objects too (tests, embedding): no filter, their own or the default timeout."""
    if isinstance(action, ConfiguredAction):
        return action
    name = getattr(action, "name", type(action).__name__)
    return ConfiguredAction(
        name, name, action, None, float(getattr(action, "timeout", None) or DEFAULT_TIMEOUT)
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, ActionError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
