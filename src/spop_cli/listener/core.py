"""The asyncio listener: the vendor's lifecycle table, reconnection, acks, exactly-once callbacks."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Any

from .. import client
from ..address import Address, desk_identity, parse_addresses, spread_order
from ..diagnostics import flush_diagnostics, log_line, open_diagnostics
from ..model import (
    ContactChange,
    Error,
    ListenerStatus,
    Media,
    ScreenPopError,
    ScreenPopEvent,
    validate_resource,
)
from .handled import DEFAULT_KEEP, MARGIN, HandledIds
from .shared import LinkPool, Member

S = ListenerStatus


class AsyncListener:
    """Watches one extension or user ID on one hub; many may share a process and a loop."""

    def __init__(
        self,
        media: Media | str,
        *,
        reconnecting_interval: float = 30.0,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        pool: LinkPool | None = None,
        spread: bool = False,
    ) -> None:
        self.media = media if isinstance(media, Media) else Media.parse(media)
        # several hubs: tried in this desktop's own order (spread_order), not the list's
        self.spread = spread
        self.reconnecting_interval = reconnecting_interval
        self.token = token
        self.ssl_context = ssl_context
        self.timeout = timeout
        # listeners given the same pool share a hub connection (spop listen gives all its own)
        self.pool = pool
        self.status = S.Status_Down
        self.administration_server_address = ""
        self.resource = ""
        self.pops_received = 0
        self.last_pop: ScreenPopEvent | None = None
        self.next_retry_at: float | None = None
        self.log: logging.Logger = logging.getLogger("spop.listener")
        self._address = ""
        self._addresses: list[Address] = []  # the hubs of a cluster, in the order given
        self._order: list[int] = []  # the order they are tried in: the list's, or spread
        self._current = 0  # the index of the hub we are (or were last) connected to
        self._link: client.HubLink | Member | None = None
        self._pop_callbacks: list[Callable[..., Any]] = []
        self._status_callbacks: list[Callable[..., Any]] = []
        self._change_callbacks: list[Callable[..., Any]] = []
        self.changes_received = 0
        # ids handled within the hub's pop_ttl (plus a margin): a replayed pop runs nothing twice
        self._handled = HandledIds(DEFAULT_KEEP + MARGIN)
        self._reconnect_task: asyncio.Task[None] | None = None
        self._resume: S = S.Status_Idle  # the state to come back to after a loss
        self._tasks: set[asyncio.Task[Any]] = set()
        # Pops that arrive between our `register` and its answer (pending ones, sent at once)
        # wait here so callbacks see the listener Up; None when not registering.
        self._early: list[dict[str, Any]] | None = None
        self._acks: list[str] = []
        self._reading = False  # inside our link's data_received: acks go at its end
        # stop_listening has begun: pops the hub sent before it reads our `unregister` are not
        # handled (an ack after the unregister would be refused: the hub keeps them)
        self._leaving = False

    # -- vendor names -----------------------------------------------------------------------
    @property
    def extension(self) -> str:
        return self.resource

    @property
    def user_id(self) -> str:
        return self.resource

    # -- callbacks ------------------------------------------------------------------------
    def on_screen_pop(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Call fn(event) for every pop, once per pop. Returns fn, so it works as a decorator."""
        self._pop_callbacks.append(fn)
        return fn

    def on_contact_changed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Call fn(change) for every update of a contact this listener was popped for (a
        `ContactChange`), once per change. Returns fn, so it works as a decorator.

        The listener asks the hub for updates (protocol 2) only when it has such a callback as
        it connects: add it before `initialize` (or it counts from the next reconnection)."""
        self._change_callbacks.append(fn)
        return fn

    def on_status_changed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Call fn(old, new) on every status change. Returns fn."""
        self._status_callbacks.append(fn)
        return fn

    def _set_status(self, new: S) -> None:
        old = self.status
        if old is new:
            return
        self.status = new
        self.log.info("%s %s: %s -> %s", self.media, self.resource or "-", old.value, new.value)
        for fn in list(self._status_callbacks):
            try:
                self._call(fn, old, new)
            except Exception:
                self.log.exception("status callback failed")

    def _call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any] | None:
        """Call fn; an awaitable result runs on as a task, returned so the caller may wait."""
        result = fn(*args)
        if result is None or not inspect.isawaitable(result):
            return None
        task = asyncio.ensure_future(result)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the lifecycle table --------------------------------------------------------------
    async def initialize(self, address: str) -> None:
        """Down → Idle, once the hub has answered the handshake."""
        if self.status is not S.Status_Down:
            raise ScreenPopError(
                Error.SCREENPOP_Wrong_Status, f"initialize needs Status_Down, not {self.status}"
            )
        # a malformed address is an Initialization_Error, before any I/O
        self._addresses = parse_addresses(address)
        self._order = (
            spread_order(self._addresses, desk_identity())
            if self.spread
            else list(range(len(self._addresses)))
        )
        self.log = open_diagnostics("listener")
        self.log.info("%s initialize %s", self.media, address)
        try:
            self._link = await self._connect_any()
        except ScreenPopError as exc:
            self.log.error("initialize %s failed: %s", address, exc)
            raise
        self._address = address
        self.administration_server_address = address
        self._set_status(S.Status_Idle)

    async def start_listening(self, resource: str) -> None:
        """Idle → Up once the hub has registered us for (media, resource)."""
        if self.status is S.Status_Up:
            raise ScreenPopError(
                Error.SCREENPOP_Already_Registered,
                f"already listening on {self.media} {self.resource}",
            )
        if self.status is not S.Status_Idle:
            raise ScreenPopError(
                Error.SCREENPOP_Wrong_Status,
                f"start_listening needs Status_Idle, not {self.status}",
            )
        try:
            resource = validate_resource(resource)
        except ScreenPopError as exc:
            raise ScreenPopError(Error.SCREENPOP_Cannot_Register, exc.message) from None
        assert self._link is not None
        self._early = []
        try:
            self._link = await self._bound(self._link, resource)
            await self._link.request(
                "register", timeout=self.timeout, media=self.media.value, resource=resource
            )
        except ScreenPopError as exc:
            self._early = None
            self.log.error("start_listening %s failed: %s", resource, exc)
            if exc.code is Error.SCREENPOP_Cannot_Find_HiPath_ProCenter:
                raise ScreenPopError(Error.SCREENPOP_Cannot_Register, exc.message) from None
            raise
        self.resource = resource
        self._set_status(S.Status_Up)
        self._flush_early()

    def _flush_early(self) -> None:
        early, self._early = self._early, None
        for data in early or ():
            self._on_pop(data)

    async def stop_listening(self) -> None:
        """Up or Reconnecting → Idle."""
        if self.status not in (S.Status_Up, S.Status_Reconnecting):
            raise ScreenPopError(
                Error.SCREENPOP_Wrong_Status,
                f"stop_listening needs Status_Up or Status_Reconnecting, not {self.status}",
            )
        self._resume = S.Status_Idle
        self._send_acks()  # before `unregister`: the hub takes acks only from a registered key
        link = self._link
        if self.status is S.Status_Up and link is not None and not link.lost:
            self._leaving = True
            try:
                await link.request(
                    "unregister",
                    timeout=self.timeout,
                    media=self.media.value,
                    resource=self.resource,
                )
            except ScreenPopError as exc:
                self.log.warning("unregister %s: %s", self.resource, exc)
            finally:
                self._leaving = False
        if self.pool is not None and isinstance(link, Member):
            self.pool.unbind(link)
        self._set_status(S.Status_Idle)

    async def shutdown(self) -> None:
        """Idle, Up or Reconnecting → Down (stops listening first); may initialize again after."""
        if self.status is S.Status_Down:
            raise ScreenPopError(
                Error.SCREENPOP_Wrong_Status, "shutdown needs an initialized listener"
            )
        if self.status is S.Status_Up:
            await self.stop_listening()
        self._resume = S.Status_Down
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            self._reconnect_task = None
        self.next_retry_at = None
        link, self._link = self._link, None
        if link is not None:
            link.on_lost = None
            await link.goodbye(min(self.timeout, 2.0))
        self._set_status(S.Status_Down)
        # the diagnostics are written by a thread: what this listener said is in the file now
        await asyncio.to_thread(flush_diagnostics, self.log)

    # -- wiring ---------------------------------------------------------------------------
    async def _connect_any(self, lost: int | None = None) -> client.HubLink | Member:
        """Try the hubs in our order; the first that answers is ours. `lost`: the hub we lost,
        tried last; in the list's order the ones after it come first (a standby stays in use),
        with `spread` our order from the top (a preferred hub back up gets us back). A refusal
        (bad token) is raised at once; if none can be reached, the last failure."""
        count = len(self._addresses)
        order = self._order
        if lost is not None:
            if self.spread:
                order = [i for i in order if i != lost] + [lost]
            else:
                order = order[lost + 1 :] + order[: lost + 1]
        for step, index in enumerate(order):
            try:
                link = await self._connect(str(self._addresses[index]))
            except ScreenPopError as exc:
                if (
                    exc.code is not Error.SCREENPOP_Cannot_Find_HiPath_ProCenter
                    or step == count - 1
                ):
                    raise
                self.log.info("hub %s unreachable: %s", self._addresses[index], exc)
                continue
            self._current = index
            return link
        raise ScreenPopError(Error.SCREENPOP_Cannot_Find_HiPath_ProCenter, "no hub address")

    async def _connect(self, address: str) -> client.HubLink | Member:
        connect = client.connect if self.pool is None else self.pool.connect
        link = await connect(
            address,
            token=self.token,
            timeout=self.timeout,
            ssl_context=self.ssl_context,
            on_pop=self._on_read_pop,
            on_lost=self._on_lost,
            on_change=self._on_change if self._change_callbacks else None,
        )
        link.on_read_done = self._on_read_done
        if self._change_callbacks and not link.updates:
            self.log.warning("the hub at %s sends no contact updates (protocol 1)", address)
        if link.pop_ttl is not None:  # the hub replays a pop for that long: remember ids longer
            self._handled.keep = max(self._handled.keep, link.pop_ttl + MARGIN)
        return link

    async def _bound(self, link: client.HubLink | Member, resource: str) -> client.HubLink | Member:
        """On a shared connection, pops of (media, resource) come to us from now on (the member
        may be another one, on another connection: LinkPool.bind); an own link as it is."""
        if self.pool is not None and isinstance(link, Member):
            return await self.pool.bind(link, (self.media.value, resource))
        return link

    def _on_change(self, data: dict[str, Any]) -> None:
        """A contact update: like a pop, handled once (ids remembered), acked after the
        callbacks (after an awaitable one completes)."""
        if self._early is not None:
            self._early.append({"__change__": data})
            return
        change_id = str(data.get("id", ""))
        if self.status is not S.Status_Up or self._leaving:
            return
        if change_id in self._handled:
            self._ack(change_id)
            return
        try:
            change = ContactChange.from_dict(data)
        except (KeyError, ValueError, TypeError, ScreenPopError) as exc:
            self.log.error("bad change from the hub dropped: %s %r", exc, data)
            return
        self._handled.add(change_id)
        self.changes_received += 1
        self.log.info(
            "change %s %s %s: %s", change.id, change.contact_id, change.resource, change.change
        )
        pending = []
        for fn in list(self._change_callbacks):
            try:
                task = self._call(fn, change)
            except Exception:
                self.log.exception("contact-changed callback failed for change %s", change_id)
                continue
            if task is not None:
                pending.append(task)
        if not pending:
            self._ack(change_id)
            return
        self._ack_after(pending, change_id, "contact-changed callback failed for change")

    def _on_pop(self, data: dict[str, Any]) -> None:
        if "__change__" in data:  # an update held with the early pops, in order
            self._on_change(data["__change__"])
            return
        pop_id = str(data.get("id", ""))
        if self._early is not None:
            self._early.append(data)
            return
        if self.status is not S.Status_Up or self._leaving:
            return  # not ours any more (stopping): no ack, the hub keeps it for the others
        if pop_id in self._handled:
            self._ack(pop_id)
            return
        try:
            event = ScreenPopEvent.from_dict(data)
        except (KeyError, ValueError, TypeError, ScreenPopError) as exc:
            self.log.error("bad pop from the hub dropped: %s %r", exc, data)
            return
        handled = self._handled
        overflowed = handled.overflowed
        handled.add(pop_id)
        if handled.overflowed > overflowed and not overflowed:
            self.log.warning(
                "more than %d pops handled within %.0f s: the oldest ids are forgotten early, "
                "so a replay of one of them would run its callbacks again",
                handled.limit,
                handled.keep,
            )
        self.pops_received += 1
        self.last_pop = event
        log_line(
            self.log,
            logging.INFO,
            "pop %s %s %s from %s queue %r wait %s",
            event.id,
            event.media._value_,
            event.resource,
            event.source,
            event.queue_name,
            event.wait_time,
        )
        pending = []
        for fn in list(self._pop_callbacks):
            try:
                task = self._call(fn, event)
            except Exception:
                self.log.exception("screen-pop callback failed for pop %s", pop_id)
                continue
            if task is not None:
                pending.append(task)
        if not pending:
            self._ack(pop_id)
            return
        # A callback that returned an awaitable (an async callback, a blocking listener's
        # hand-off to its thread, `spop listen` with an action far behind) has handled the pop
        # only when that completes: ack then.
        self._ack_after(pending, pop_id, "screen-pop callback failed for pop")

    def _ack_after(self, pending: list[asyncio.Future[Any]], ack_id: str, failed: str) -> None:
        """Ack once every awaitable completes, in the loop turn the last one does (no gather
        in between: a listener about to stop lets one turn pass for these acks to be made).
        A failure is logged and acked all the same, like a callback that raises at once."""
        left = len(pending)

        def done(future: asyncio.Future[Any]) -> None:
            nonlocal left
            error = None if future.cancelled() else future.exception()
            if error is not None:
                self.log.error("%s %s", failed, ack_id, exc_info=error)
            left -= 1
            if left == 0:
                self._ack(ack_id)

        for future in pending:
            future.add_done_callback(done)

    def _on_read_pop(self, data: dict[str, Any]) -> None:
        """A pop frame of one read of our link: its ack waits for the end of that read."""
        self._reading = True
        self._on_pop(data)

    def _on_read_done(self) -> None:
        """The end of one read of our link: the acks of its pops leave now, together, in the
        loop turn they were handled in (no extra turn, no call_soon per read)."""
        if self._reading:
            self._reading = False
            if self._acks:
                self._send_acks()

    def _ack(self, pop_id: str) -> None:
        """Acks leave after the callbacks ran: at the end of the read the pop came in, or (an
        ack from elsewhere: an awaited callback, an early pop) at the end of the loop iteration."""
        if not self._acks and not self._reading:
            asyncio.get_running_loop().call_soon(self._send_acks)
        self._acks.append(pop_id)

    def _send_acks(self) -> None:
        ids, self._acks = self._acks, []
        link = self._link
        if ids and link is not None:
            link.send_acks(ids)

    def _on_lost(self, exc: Exception | None) -> None:
        if self.status not in (S.Status_Idle, S.Status_Up):
            return
        self._resume = self.status
        self.log.warning(
            "connection to %s lost: %s", self._addresses[self._current], exc or "closed by the hub"
        )
        self._set_status(S.Status_Reconnecting)
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Back off with jitter, capped by reconnecting_interval; restore the registration."""
        delay = min(0.25, self.reconnecting_interval)
        while self._resume is not S.Status_Down:
            wait = random.uniform(delay / 2, delay)
            self.next_retry_at = time.monotonic() + wait
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.reconnecting_interval)
            link: client.HubLink | Member | None = None
            try:
                link = await self._connect_any(lost=self._current)  # it is tried last
                if self._resume is S.Status_Up:
                    self._early = []
                    link = await self._bound(link, self.resource)
                    await link.request(
                        "register",
                        timeout=self.timeout,
                        media=self.media.value,
                        resource=self.resource,
                    )
            except ScreenPopError as exc:
                self._early = None
                self.log.info("reconnect to %s failed: %s", self._address, exc)
                if link is not None:
                    link.on_lost = None
                    link.close()
                continue
            except BaseException:  # shut down mid-attempt: close what was opened
                self._early = None
                if link is not None:
                    link.on_lost = None
                    link.close()
                raise
            if self._resume is S.Status_Down:  # shut down meanwhile
                self._early = None
                link.on_lost = None
                link.close()
                return
            self._link = link
            self.next_retry_at = None
            self._reconnect_task = None
            self.log.info("reconnected to %s", self._addresses[self._current])
            if self.status is S.Status_Reconnecting:
                self._set_status(self._resume)
            self._flush_early()
            return
