"""One `spop listen` run: many listeners in one loop, each with its dispatcher; counting and stopping.

No terminal I/O here: the command line passes callbacks and renders `snapshot()` (see view.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .actions import ConfiguredAction
from .dispatch import ActionDispatcher, Outcome
from .model import ListenerStatus, ScreenPopError

RECENT_POPS = 12
KEPT_POPS = 1000  # pops per listener kept to give a change's actions its pop's fields
# The changes after which a resource no longer follows the contact (docs/contacts.md, Updates):
# no later change names that pop, so the listener lets it go. Answered and transferred end the
# following only for the others (answered elsewhere, picked up, moved on).
LAST_CHANGES = frozenset({"requeued", "withdrawn", "ended", "transferred"})
LAST_ANSWERS = frozenset({"answered elsewhere", "picked up"})
POPPED_AGAIN = "popped again"  # a card a newer pop of its contact replaced on the same listener


@dataclass(frozen=True)
class ListenerPlan:
    """What to listen to and what to do with its pops."""

    media: str
    resource: str
    actions: Sequence[ConfiguredAction] = ()


@dataclass(frozen=True)
class ListenerRow:
    media: str
    resource: str
    status: str
    pops_received: int
    last_pop_at: float | None  # time.time() of the last pop
    last_source: str
    last_queue: str
    retry_in: float | None  # seconds to the next reconnect attempt
    failures: int
    actions: tuple[str, ...]


@dataclass
class PopRow:
    received_at: float
    media: str
    resource: str
    pop_id: str
    source: str
    queue: str
    description: str
    wait_time: int
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    destination: str = ""
    from_: str = ""
    redirect: str = ""
    contact_data: tuple[tuple[str, str], ...] = ()  # (key, value), in the pop's order
    # the contact as it moves (contact updates): "" until the first change, then its name
    state: str = ""
    state_detail: str = ""  # who answered, to whom it went, why it was withdrawn
    talk_since: float | None = None  # time.time() it was answered here: the running clock
    talk_time: int | None = None  # seconds talked, once ended


@dataclass(frozen=True)
class Snapshot:
    """Everything the live view shows, copied at one instant."""

    server: str
    listeners: tuple[ListenerRow, ...]
    pops: tuple[PopRow, ...]  # newest first
    failures: int
    pending: int
    target: int | None  # pops to wait for (--once / --count)


@dataclass
class _Entry:
    plan: ListenerPlan
    listener: Any
    dispatcher: ActionDispatcher
    last_pop_at: float | None = None  # time.time() of its last pop
    # contact id → its last pop here, newest last: the contacts this listener still follows
    # (changes to come). One per contact: a change names the last pop the resource got for it
    # (docs/protocol.md), so a newer pop of the contact replaces the older one.
    pops: OrderedDict[str, Any] = field(default_factory=OrderedDict)


class ListenSession:
    """Starts the listeners, feeds their pops to the dispatchers, ends on count, timeout or stop."""

    def __init__(
        self,
        plans: Sequence[ListenerPlan],
        *,
        address: str,
        token: str | None = None,
        reconnecting_interval: float = 30.0,
        spread: bool = False,
        ssl_context: Any = None,
        connect_timeout: float = 10.0,
        count: int | None = None,
        plugin_manager: Any = None,
        logger: logging.Logger | None = None,
        on_pop: Callable[[Any, Any], None] | None = None,
        on_status: Callable[[Any, ListenerStatus, ListenerStatus], None] | None = None,
        on_result: Callable[[Any, str, Any, Outcome], None] | None = None,
        listener_factory: Callable[..., Any] | None = None,
        on_change: Callable[[Any, Any], None] | None = None,
        before_acks: Callable[[], None] | None = None,
    ) -> None:
        self.plans = list(plans)
        self.address = address
        self.token = token
        self.reconnecting_interval = reconnecting_interval
        self.spread = spread
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.count = count
        self.plugin_manager = plugin_manager
        self.log = logger or logging.getLogger("spop.listener")
        self.on_pop = on_pop
        self.on_status = on_status
        self.on_result = on_result
        self.on_change = on_change
        self.changes = 0  # contact changes received
        self.listener_factory = listener_factory
        if before_acks is not None and listener_factory is not None:
            raise ValueError("before_acks needs the session's own listeners (no listener_factory)")
        self.before_acks = before_acks
        self.entries: list[_Entry] = []
        self.received = 0  # distinct pops handed to the actions
        self._counted: set[str] = set()  # their ids, while a count is to be reached
        # the last pops, newest first: each a (received_at, event) pair until its PopRow is
        # wanted (an outcome, a change, a snapshot), so the pops no view shows cost no row
        self.recent: deque[PopRow | tuple[float, Any]] = deque(maxlen=RECENT_POPS)
        self._rows: dict[str, PopRow | tuple[float, Any]] = {}  # pop id → its entry in `recent`
        self._enough = asyncio.Event()

    @property
    def failures(self) -> int:
        return sum(entry.dispatcher.failures for entry in self.entries)

    @property
    def pending(self) -> int:
        return sum(entry.dispatcher.pending for entry in self.entries)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Initialize and start every listener; on the first error shut the others down and raise."""
        factory = self.listener_factory
        options: dict[str, Any] = {"spread": True} if self.spread else {}
        if factory is None:
            from .listener.core import AsyncListener
            from .listener.shared import LinkPool

            factory = AsyncListener
            # one connection per hub for all our listeners (up to 1,000 each): a pop batch is
            # one read here and one send in the hub, a read's acks one frame
            options["pool"] = LinkPool(before_acks=self.before_acks)
        for plan in self.plans:
            listener = factory(
                plan.media,
                reconnecting_interval=self.reconnecting_interval,
                token=self.token,
                ssl_context=self.ssl_context,
                timeout=self.connect_timeout,
                **options,
            )
            entry = _Entry(plan, listener, self._dispatcher(listener, plan))
            listener.on_screen_pop(lambda event, entry=entry: self._received(entry, event))
            listener.on_status_changed(lambda old, new, entry=entry: self._status(entry, old, new))
            if hasattr(listener, "on_contact_changed"):  # the live view and --json show them
                listener.on_contact_changed(
                    lambda change, entry=entry: self._changed(entry, change)
                )
            self.entries.append(entry)
        try:
            for entry in self.entries:
                await entry.listener.initialize(self.address)
                await entry.listener.start_listening(entry.plan.resource)
        except ScreenPopError:
            await self.finish(drain_timeout=0)
            raise

    async def wait(self, timeout: float | None = None, stop: asyncio.Event | None = None) -> str:
        """Until `count` pops arrived ("count"), `timeout` passed ("timeout") or `stop` is set ("stopped")."""
        waiters = {asyncio.ensure_future(self._enough.wait()): "count"}
        if stop is not None:
            waiters[asyncio.ensure_future(stop.wait())] = "stopped"
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in waiters:
                task.cancel()
        if not done:
            return "timeout"
        # A pop and a signal at the same instant: the pop count wins, it is what was asked for.
        reasons = {waiters[task] for task in done}
        return "count" if "count" in reasons else "stopped"

    async def finish(self, drain_timeout: float | None = None) -> bool:
        """Stop listening, let the actions finish (drain), shut down. False if actions were still busy."""
        for entry in self.entries:
            entry.dispatcher.release_held()
        await asyncio.sleep(0)  # their acks are made in the callbacks this lets run
        for entry in self.entries:
            if entry.listener.status in (
                ListenerStatus.Status_Up,
                ListenerStatus.Status_Reconnecting,
            ):
                await self._quietly(entry.listener.stop_listening())
        drained = True
        if drain_timeout is None or drain_timeout > 0:
            results = await asyncio.gather(
                *(e.dispatcher.drain(drain_timeout) for e in self.entries)
            )
            drained = all(results)
        for entry in self.entries:
            if entry.listener.status is not ListenerStatus.Status_Down:
                await self._quietly(entry.listener.shutdown())
            entry.dispatcher.close()
        return drained

    def drain_timeout(self) -> float:
        """Long enough for the slowest action's time limit, plus a margin."""
        limits = [a.timeout for entry in self.entries for a in entry.dispatcher.actions]
        return max(limits, default=0.0) + 5.0

    async def _quietly(self, call: Any) -> None:
        try:
            await call
        except ScreenPopError as exc:
            self.log.warning("while stopping: %s", exc)

    # -- callbacks ------------------------------------------------------------------------
    def _dispatcher(self, listener: Any, plan: ListenerPlan) -> ActionDispatcher:
        def on_result(action_name: str, pop: Any, outcome: Outcome) -> None:
            # a change's action shows on the card of the pop it follows
            row = self._row(getattr(pop, "id", "")) or self._row(getattr(pop, "pop_id", None) or "")
            if row is not None:
                row.outcomes[action_name] = outcome
            if self.on_result is not None:
                self.on_result(listener, action_name, pop, outcome)

        return ActionDispatcher(
            plan.actions, self.log, on_result, plugin_manager=self.plugin_manager
        )

    def _received(self, entry: _Entry, event: Any) -> asyncio.Future[Any] | None:
        # Quick and non-blocking: the listener acks the pop to the hub once this returns, or
        # once the future it returns completes (an action MAX_QUEUED pops behind).
        if self.count is not None:
            # `--count N` is N distinct pops: an id the listener let through again (its memory
            # of handled ids is bounded) neither counts nor runs the actions twice
            if event.id in self._counted:
                return None
            if self.received >= self.count:
                # past N (the rest of a backlog's window): not handled and never acked, so the
                # hub keeps it for the next run
                return asyncio.get_running_loop().create_future()
            self._counted.add(event.id)
        self.received += 1
        entry.last_pop_at = time.time()
        recent = self.recent
        if len(recent) == recent.maxlen:
            self._rows.pop(_row_id(recent[-1]), None)
        item = (entry.last_pop_at, event)
        recent.appendleft(item)
        self._rows[event.id] = item
        contact_id = event.contact_id
        if contact_id:  # a pop without a contact is never followed: no change names it
            # Only these are kept: 1,000 listeners keeping every pop filled the process (and the
            # garbage collector's full passes, tens of ms each) with pops no change will name.
            earlier = entry.pops.pop(contact_id, None)
            entry.pops[contact_id] = event
            if earlier is not None and earlier.id != event.id:
                self._supersede(earlier.id, entry.last_pop_at)
            elif len(entry.pops) > KEPT_POPS:
                entry.pops.popitem(last=False)
        held = entry.dispatcher.submit(event, entry.listener)
        if self.on_pop is not None:
            self.on_pop(entry.listener, event)
        if self.count is not None and self.received >= self.count:
            self._enough.set()
        return held

    def _changed(self, entry: _Entry, change: Any) -> asyncio.Future[Any] | None:
        """A contact update: to the actions whose `on` names it, the hook, the view."""
        self.changes += 1
        pop = entry.pops.get(change.contact_id)
        if pop is not None and pop.id != change.pop_id:
            pop = None  # a change for an earlier pop (not sent by the hub): not this pop's fields
        held = entry.dispatcher.submit_change(change, pop, entry.listener)
        if pop is not None and (
            change.change in LAST_CHANGES
            or (change.change == "answered" and change.reason in LAST_ANSWERS)
        ):
            del entry.pops[change.contact_id]  # no longer followed: no change will name it
        row = self._row(change.pop_id)
        if row is not None:
            _move(row, change)
        if self.on_change is not None:
            self.on_change(entry.listener, change)
        return held

    def _supersede(self, pop_id: str, at: float) -> None:
        """A newer pop of its contact reached the same listener (a recall, a queue ringing the
        agent again): the hub's changes name the newer pop from now on, so the earlier card stops
        following the contact, `popped again`, instead of staying `ringing` (or `talking`) for
        good."""
        row = self._row(pop_id)
        if row is not None:
            row.state = POPPED_AGAIN
            row.state_detail = f"at {time.strftime('%H:%M:%S', time.localtime(at))}"
            row.talk_since = None

    def _status(self, entry: _Entry, old: ListenerStatus, new: ListenerStatus) -> None:
        entry.dispatcher.status_changed(entry.listener, old, new)
        if self.on_status is not None:
            self.on_status(entry.listener, old, new)

    # -- the view's data ------------------------------------------------------------------
    def snapshot(self, now: float | None = None) -> Snapshot:
        now = time.monotonic() if now is None else now
        rows = []
        for entry in self.entries:
            listener, last = entry.listener, entry.listener.last_pop
            retry_at = listener.next_retry_at
            rows.append(
                ListenerRow(
                    media=str(listener.media),
                    resource=listener.resource or entry.plan.resource,
                    status=str(listener.status),
                    pops_received=listener.pops_received,
                    last_pop_at=entry.last_pop_at,
                    last_source=last.source if last is not None else "",
                    last_queue=last.queue_name if last is not None else "",
                    retry_in=max(0.0, retry_at - now)
                    if retry_at is not None
                    and listener.status is ListenerStatus.Status_Reconnecting
                    else None,
                    failures=entry.dispatcher.failures,
                    actions=tuple(a.name for a in entry.dispatcher.actions),
                )
            )
        pops = tuple(
            PopRow(
                r.received_at,
                r.media,
                r.resource,
                r.pop_id,
                r.source,
                r.queue,
                r.description,
                r.wait_time,
                dict(r.outcomes),
                r.destination,
                r.from_,
                r.redirect,
                r.contact_data,
                r.state,
                r.state_detail,
                r.talk_since,
                r.talk_time,
            )
            for r in map(self._materialized, list(self.recent))
        )
        return Snapshot(self.address, tuple(rows), pops, self.failures, self.pending, self.count)

    def _row(self, pop_id: str) -> PopRow | None:
        """The card of a recent pop (made now if it had none yet); None once it is not recent."""
        item = self._rows.get(pop_id)
        return None if item is None else self._materialized(item)

    def _materialized(self, item: PopRow | tuple[float, Any]) -> PopRow:
        if item.__class__ is PopRow:
            return item  # type: ignore[return-value]
        received_at, event = item  # type: ignore[misc]
        row = pop_row(received_at, event)
        if self._rows.get(event.id) is item:
            self._rows[event.id] = row
        for index, other in enumerate(self.recent):
            if other is item:
                self.recent[index] = row
                break
        return row


def _row_id(item: PopRow | tuple[float, Any]) -> str:
    return item.pop_id if item.__class__ is PopRow else item[1].id  # type: ignore[union-attr,index]


def pop_row(received_at: float, event: Any) -> PopRow:
    """A pop's card in the live view."""
    return PopRow(
        received_at,
        str(event.media),
        event.resource,
        event.id,
        event.source,
        event.queue_name,
        event.contact_description,
        event.wait_time,
        destination=event.destination,
        from_=event.from_,
        redirect=event.redirect,
        contact_data=_pairs(event.contact_data),
        state=first_state(str(event.media), event.contact_id),
    )


def _pairs(contact_data: Any) -> tuple[tuple[str, str], ...]:
    pairs = getattr(contact_data, "pairs", None)
    if pairs is not None:
        return pairs()  # type: ignore[no-any-return]
    return tuple((item.key, item.value) for item in contact_data)


def first_state(media: str, contact_id: str) -> str:
    """A pop of a tracked contact starts `ringing` (a call) or `offered` (the other media) until
    its first change; a pop with no contact is never followed, so its card shows no state."""
    if not contact_id:
        return ""
    return "ringing" if media == "telephone" else "offered"


def _move(row: PopRow, change: Any) -> None:
    """A pop's card follows its contact: talking (a clock runs), transferred, ended…"""
    kind = change.change
    if kind == "answered" and change.answered_by == row.resource:
        row.state, row.state_detail = "talking", ""
        if row.talk_since is None:
            row.talk_since = time.time()
    elif kind == "answered":
        row.state, row.state_detail = "answered elsewhere", f"by {change.answered_by}"
    elif kind == "transferred":
        row.state, row.state_detail = "transferred", f"to {change.transferred_to}"
    elif kind == "consulted":
        row.state_detail = f"consulting {change.consulted}"
        row.state = "talking" if row.state in ("", "ringing", "offered") else row.state
    elif kind == "conferenced":
        row.state_detail = change.reason
        row.state = "talking" if row.state in ("", "ringing", "offered") else row.state
    elif kind == "ended":
        row.state, row.talk_time = "ended", change.talk_time
        row.state_detail = change.reason
    else:  # requeued, withdrawn
        row.state, row.state_detail = kind, change.reason
