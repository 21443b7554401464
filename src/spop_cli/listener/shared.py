"""One hub connection for many listeners of one loop: N registrations, one socket.

`spop listen` with 1,000 listeners used to open 1,000 connections to the same hub. Each pop
was then a system call of its own in the hub and a read of its own here, and each ack a frame
and a send of its own. Listeners that share a connection get the pops of one hub turn in one
read and send the acks of one read as one frame. The protocol always allowed it: a connection
may hold many registrations (the hub's `max_registrations`), as long as each (media, resource)
is registered once on it.

A listener with a pool gets a `Member` in place of its own `HubLink`; the member speaks for it
on the shared link, and the link hands each pop and change to the member of its key.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from .. import client
from ..model import ScreenPopError

PER_LINK = 1000  # listeners on one connection at most: the hub's max_inflight window is shared

Key = tuple[str, str]  # (media, resource), as the hub keys a registration


class Member:
    """One listener's side of a shared connection: the calls `AsyncListener` makes on a link."""

    __slots__ = (
        "shared",
        "key",
        "on_pop",
        "on_change",
        "on_lost",
        "on_read_done",
        "touched",
        "left",
    )

    def __init__(
        self,
        shared: SharedLink,
        on_pop: Callable[[dict[str, Any]], None] | None,
        on_change: Callable[[dict[str, Any]], None] | None,
        on_lost: Callable[[Exception | None], None] | None,
    ) -> None:
        self.shared = shared
        self.key: Key | None = None  # what it listens to, once bound
        self.on_pop = on_pop
        self.on_change = on_change
        self.on_lost = on_lost
        self.on_read_done: Callable[[], None] | None = None
        self.touched = False  # got a frame in the read being handled
        self.left = False

    # what the hub announced, as HubLink has it
    @property
    def lost(self) -> bool:
        link = self.shared.link
        return self.left or link is None or link.lost

    @property
    def updates(self) -> bool:
        link = self.shared.link
        return link is not None and link.updates

    @property
    def max_frame(self) -> int:
        link = self.shared.link
        return link.max_frame if link is not None else client.MAX_FRAME

    @property
    def pop_ttl(self) -> float | None:
        link = self.shared.link
        return link.pop_ttl if link is not None else None

    async def request(self, op: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        link = self.shared.link
        if link is None or self.left:
            raise client.not_connected()
        self.shared.flush_acks()  # before the request, as on a connection of its own
        return await link.request(op, timeout=timeout, **fields)

    def send_acks(self, ids: list[str]) -> None:
        """Acks join the shared link's: one frame per read (or per loop turn) for all members."""
        if not self.left:
            self.shared.queue_acks(ids)

    def close(self) -> None:
        """Leave the connection; the last member to leave closes it."""
        self.shared.leave(self)

    async def goodbye(self, timeout: float) -> None:
        """Leave; the last member says `bye` to the hub first, as a listener of its own would."""
        await self.shared.leave_politely(self, timeout)


class SharedLink:
    """A `HubLink` and its members, keyed by what each listens to."""

    def __init__(self, pool: LinkPool, params: tuple[Any, ...], limit: int) -> None:
        self.pool = pool
        self.params = params
        self.limit = limit  # members at most: the pool's, or less when the hub says so
        self.members: list[Member] = []
        self.by_key: dict[Key, Member] = {}
        self.link: client.HubLink | None = None
        self.ready: asyncio.Future[client.HubLink] | None = None
        self._acks: list[str] = []
        self._touched: list[Member] = []
        self._reading = False
        self._flush_soon = False

    @property
    def lost(self) -> bool:
        return self.link is not None and self.link.lost

    def room_for(self, key: Key | None) -> bool:
        return (
            not self.lost
            and len(self.members) < self.limit
            and (key is None or key not in self.by_key)
        )

    # -- frames from the hub --------------------------------------------------------------
    def _pop(self, data: dict[str, Any]) -> None:
        member = self.by_key.get((data.get("media"), data.get("resource")))  # type: ignore[arg-type]
        if member is None or member.on_pop is None:
            return  # no longer ours (unregistered): no ack, the hub keeps it for the others
        if not member.touched:
            member.touched = True
            self._touched.append(member)
        member.on_pop(data)

    def _change(self, data: dict[str, Any]) -> None:
        member = self.by_key.get((data.get("media"), data.get("resource")))  # type: ignore[arg-type]
        if member is not None and member.on_change is not None:
            member.on_change(data)

    def _read_done(self) -> None:
        """The end of one read: each member that got pops sends its acks; they leave as one."""
        touched, self._touched = self._touched, []
        self._reading = True
        try:
            for member in touched:
                member.touched = False
                if member.on_read_done is not None:
                    member.on_read_done()
        finally:
            self._reading = False
        if self._acks:
            self.flush_acks()

    def _lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        for member in list(self.members):
            if member.on_lost is not None:
                member.on_lost(exc)

    # -- acks -----------------------------------------------------------------------------
    def queue_acks(self, ids: list[str]) -> None:
        self._acks.extend(ids)
        if not self._reading and not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self.flush_acks)

    def flush_acks(self) -> None:
        """The acks queued so far leave now (at the end of a read or loop turn, or before
        a request: an `unregister` after them, or the hub would not take them)."""
        self._flush_soon = False
        ids, self._acks = self._acks, []
        link = self.link
        if ids and link is not None:
            before = self.pool.before_acks
            if before is not None:
                before()  # e.g. stdout's buffer: each line out before its pop is acked
            link.send_acks(ids)

    # -- members --------------------------------------------------------------------------
    def join(self, member: Member) -> None:
        self.members.append(member)

    def bind(self, member: Member, key: Key) -> None:
        self.by_key[key] = member
        member.key = key

    def unbind(self, member: Member) -> None:
        key, member.key = member.key, None
        if key is not None and self.by_key.get(key) is member:
            del self.by_key[key]

    def _detach(self, member: Member) -> bool:
        """Take a member out; True when it was the last one."""
        if member.left:
            return False
        self.unbind(member)
        member.left = True
        member.on_pop = member.on_change = member.on_lost = member.on_read_done = None
        if member in self.members:
            self.members.remove(member)
        if self.members:
            return False
        self.pool.forget(self)
        return True

    def leave(self, member: Member) -> None:
        if self._detach(member) and self.link is not None:
            self._close()

    async def leave_politely(self, member: Member, timeout: float) -> None:
        if not self._detach(member) or self.link is None:
            return
        if not self.link.lost:
            self.flush_acks()  # acks queued for this turn leave before the bye
            try:
                await self.link.request("bye", timeout=timeout)
            except ScreenPopError:
                pass
        self._close()

    def _close(self) -> None:
        link = self.link
        if link is not None:
            link.on_lost = None
            link.close()

    def connected(self, task: asyncio.Future[client.HubLink]) -> None:
        """The connect finished: on failure the pool forgets us (each member raises it)."""
        if task.cancelled() or task.exception() is not None:
            self.pool.forget(self)
            return
        link = task.result()
        self.link = link
        link.on_read_done = self._read_done
        hub_limit = link.max_registrations
        if hub_limit is not None:
            self.limit = min(self.limit, hub_limit)
        if not self.members:  # everyone left while it connected
            self.pool.forget(self)
            self._close()


class LinkPool:
    """Listeners of one loop that name the same hub, token, TLS context and protocol share a
    connection, up to `per_link` of them (and the hub's `max_registrations`)."""

    def __init__(
        self, per_link: int = PER_LINK, before_acks: Callable[[], None] | None = None
    ) -> None:
        if per_link < 1:
            raise ValueError("per_link must be at least 1")
        self.per_link = per_link
        # called before each batch of acks leaves: what the callbacks buffered (`spop listen
        # --json`'s lines) is written out first, once per read rather than once per pop
        self.before_acks = before_acks
        self._links: dict[tuple[Any, ...], list[SharedLink]] = {}

    @property
    def connections(self) -> int:
        """Connections open or opening (for the live view and tests)."""
        return sum(len(links) for links in self._links.values())

    async def connect(
        self,
        address: str,
        *,
        token: str | None,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
        on_pop: Callable[[dict[str, Any]], None],
        on_lost: Callable[[Exception | None], None],
        on_change: Callable[[dict[str, Any]], None] | None,
    ) -> Member:
        """A member of a connection to `address` (one being opened is joined): raises what
        connecting raised, as `client.connect` does."""
        params = (address, token, ssl_context, on_change is not None, timeout)
        shared = self._pick(params, None)
        member = Member(shared, on_pop, on_change, on_lost)
        shared.join(member)
        await self._ready(shared, member)
        return member

    async def bind(self, member: Member, key: Key) -> Member:
        """Make `member` the one that gets `key`'s pops and changes. The hub takes a key once
        per connection: a second listener of the same key (or one over the connection's limit)
        moves to another connection of the pool, opened if need be; that member is returned."""
        while True:
            shared = member.shared
            if member.lost or (key not in shared.by_key and len(shared.by_key) < shared.limit):
                shared.bind(member, key)  # a lost one fails at `register` and reconnects
                return member
            other = self._pick(shared.params, key, avoid=shared)
            moved = Member(other, member.on_pop, member.on_change, member.on_lost)
            moved.on_read_done = member.on_read_done
            other.join(moved)
            await self._ready(other, moved)  # on failure the listener keeps the member it had
            member.close()
            member = moved

    def unbind(self, member: Member) -> None:
        member.shared.unbind(member)

    def _pick(
        self, params: tuple[Any, ...], key: Key | None, avoid: SharedLink | None = None
    ) -> SharedLink:
        links = self._links.setdefault(params, [])
        for shared in links:
            if shared is not avoid and shared.room_for(key):
                return shared
        shared = SharedLink(self, params, self.per_link)
        links.append(shared)
        address, token, ssl_context, updates, timeout = params
        shared.ready = asyncio.ensure_future(
            client.connect(
                address,
                token=token,
                timeout=timeout,
                ssl_context=ssl_context,
                on_pop=shared._pop,
                on_lost=shared._lost,
                on_change=shared._change if updates else None,
            )
        )
        shared.ready.add_done_callback(shared.connected)
        return shared

    async def _ready(self, shared: SharedLink, member: Member) -> None:
        assert shared.ready is not None
        try:
            # shielded: one listener giving up (shut down mid-connect) cancels nobody else's
            await asyncio.shield(shared.ready)
        except ScreenPopError as exc:
            member.close()
            raise ScreenPopError(exc.code, exc.message) from None  # each member its own error
        except BaseException:
            member.close()
            raise

    def forget(self, shared: SharedLink) -> None:
        links = self._links.get(shared.params)
        if links is not None and shared in links:
            links.remove(shared)
            if not links:
                del self._links[shared.params]
