"""Delivery: what is pending, who gets it, what is acknowledged. The in-process backend.

This is the one interface a distributed backend (NATS JetStream: a subject per media and resource,
durable consumers, the message-id duplicate window) would implement in its place.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Container, Hashable
from dataclasses import dataclass
from typing import Protocol

from .routing import Key, Routing


class Subscriber(Hashable, Protocol):
    """A connection registered for keys. It sends pops at the pace its window of unacknowledged
    pops allows (the hub's `max_inflight`), so `deliver` and `owe` only hand them over."""

    def deliver(self, pending: Pending) -> None:
        """A live pop of one of its keys."""

    def owe(self, ids: list[str]) -> None:
        """The pops pending for a key it just registered, oldest first: a replay to pace."""

    def settled(self, pop_id: str) -> None:
        """The pop left pending (acked by anyone, withdrawn, expired): its slot is free."""


@dataclass(slots=True)
class Pending:
    id: str
    key: Key
    frame: bytes  # the encoded `pop` frame, built once for every subscriber
    expires: float  # time.time()
    contact_id: str
    sent: int = 0  # times written to a connection (an expiry says whether anyone saw it)
    change: bool = False  # a contact update (protocol 2): only opted-in connections get it
    sse: bytes | None = None  # the frame as an SSE event, built once for every browser stream


class InProcessDelivery:
    """Keeps each pop until a listener of its key acks it, its contact ends, or it expires."""

    def __init__(
        self,
        ttl: float = 120.0,
        dedupe_window: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl
        self.dedupe_window = dedupe_window
        self.clock = clock
        self.routing = Routing()
        self.pending: dict[str, Pending] = {}
        self._by_key: dict[Key, dict[str, None]] = {}
        self._by_contact: dict[str, dict[str, None]] = {}
        self._seen: dict[str, float] = {}  # id → first accepted, insertion-ordered
        # (expires, id) of every pop published, soonest first: the sweep looks only at what is
        # due, not at every pending pop (a scan of 50,000 pending updates was a 10-17 ms stall
        # a second). Entries of pops gone already are dropped when they come due.
        self._expiries: list[tuple[float, str]] = []
        self.delivered = 0  # pop frames written to connections (subscribers count them)
        self.acked = 0
        self.expired = 0
        self.withdrawn = 0
        self.duplicates = 0
        # contact updates share the pops' machinery (window, acks, replay) but not their counts
        self.changes_pending = 0
        self.changes_delivered = 0  # written by connections
        self.changes_acked = 0
        self.changes_expired = 0

    # -- listeners ------------------------------------------------------------------------
    def subscribe(self, key: Key, subscriber: Subscriber) -> bool:
        """Register; the subscriber is owed the key's pending pops. False if already registered."""
        if not self.routing.add(key, subscriber):
            return False
        owed = list(self._by_key.get(key, ()))
        if owed:
            subscriber.owe(owed)
        return True

    def unsubscribe(self, key: Key, subscriber: Subscriber) -> bool:
        return self.routing.remove(key, subscriber)

    # -- sources --------------------------------------------------------------------------
    def is_duplicate(self, pop_id: str) -> bool:
        return pop_id in self._seen

    def publish(
        self,
        pop_id: str,
        key: Key,
        frame: bytes,
        contact_id: str = "",
        expires: float | None = None,
        dedupe: bool = True,
        change: bool = False,
    ) -> bool:
        """Hold and fan out a pop. False (and nothing sent) for an id seen within the window.

        `dedupe=False` for ids the hub made itself: they cannot come twice, so they need no
        place in the duplicate window (at 20,000 pops/s that window would hold millions).
        """
        now = self.clock()
        if pop_id in self._seen or pop_id in self.pending:
            self.duplicates += 1
            return False
        if dedupe:
            self._seen[pop_id] = now
        pending = Pending(
            pop_id,
            key,
            frame,
            expires if expires is not None else now + self.ttl,
            contact_id,
            change=change,
        )
        self.pending[pop_id] = pending
        heapq.heappush(self._expiries, (pending.expires, pop_id))
        ids = self._by_key.get(key)
        if ids is None:
            ids = self._by_key[key] = {}
        ids[pop_id] = None
        if change:
            self.changes_pending += 1
        elif contact_id:  # a contact's pops, for withdrawal; its updates are never withdrawn
            self._by_contact.setdefault(contact_id, {})[pop_id] = None
        for subscriber in self.routing.of(key):
            subscriber.deliver(pending)
        return True

    def remember(self, pop_id: str, accepted: float) -> None:
        """A pop already handled before a restart: still a duplicate within the window."""
        self._seen.setdefault(pop_id, accepted)

    # -- outcomes -------------------------------------------------------------------------
    def ack(self, pop_id: str, keys: Container[Key] | None = None) -> Pending | None:
        """The pop was handled. Only a listener of its key (in `keys`, when given) may say so."""
        pending = self.pending.get(pop_id)
        if pending is None or (keys is not None and pending.key not in keys):
            return None
        self._forget(pop_id)
        if pending.change:
            self.changes_acked += 1
        else:
            self.acked += 1
        return pending

    def withdraw(self, contact_id: str) -> list[Pending]:
        """The contact ended: its undelivered pops are no longer wanted."""
        gone = [self._forget(pop_id) for pop_id in list(self._by_contact.get(contact_id, ()))]
        withdrawn = [p for p in gone if p is not None]
        self.withdrawn += len(withdrawn)
        return withdrawn

    def take_back(self, pop_ids: list[str]) -> list[Pending]:
        """Withdraw these pops (a ringall contact answered elsewhere); those still pending."""
        gone = [p for p in (self._forget(pop_id) for pop_id in pop_ids) if p is not None]
        self.withdrawn += len(gone)
        return gone

    def of_contact(self, contact_id: str) -> list[str]:
        """The ids of the contact's pending pops (what its `ended` would withdraw now)."""
        return list(self._by_contact.get(contact_id, ()))

    def expire_at(self, pop_id: str, expires: float) -> None:
        """Move a pending pop's expiry (to now: expire it at the next sweep)."""
        pending = self.pending.get(pop_id)
        if pending is not None:
            pending.expires = expires
            heapq.heappush(self._expiries, (expires, pop_id))

    def expire(self) -> list[Pending]:
        """Drop pops past their time and ids past the duplicate window; return the dropped pops."""
        now = self.clock()
        due = self._expiries
        expired: list[Pending] = []
        while due and due[0][0] <= now:
            pending = self.pending.get(heapq.heappop(due)[1])
            if pending is not None and pending.expires <= now:
                expired.append(pending)
        for pending in expired:
            self._forget(pending.id)
        changes = sum(1 for pending in expired if pending.change)
        self.changes_expired += changes
        self.expired += len(expired) - changes
        horizon = now - self.dedupe_window
        seen = self._seen
        while seen:
            pop_id, first = next(iter(seen.items()))
            if first > horizon or pop_id in self.pending:
                break
            del seen[pop_id]
        return expired

    def _forget(self, pop_id: str) -> Pending | None:
        pending = self.pending.pop(pop_id, None)
        if pending is None:
            return None
        if pending.change:
            self.changes_pending -= 1
        unindex(pending, self._by_key, self._by_contact)
        for subscriber in self.routing.of(pending.key):
            subscriber.settled(pop_id)
        return pending

    def counters(self) -> dict[str, int]:
        return {
            "pending": len(self.pending) - self.changes_pending,
            "delivered": self.delivered,
            "acked": self.acked,
            "expired": self.expired,
            "withdrawn": self.withdrawn,
            "duplicates": self.duplicates,
            "changes_pending": self.changes_pending,
            "changes_delivered": self.changes_delivered,
            "changes_acked": self.changes_acked,
            "changes_expired": self.changes_expired,
        }


def unindex(
    pending: Pending, by_key: dict[Key, dict[str, None]], by_contact: dict[str, dict[str, None]]
) -> None:
    """Drop a pop that is no longer pending from the per-key and per-contact indexes of a
    delivery backend (an index left empty goes too)."""
    for index, name in ((by_key, pending.key), (by_contact, pending.contact_id)):
        ids = index.get(name)  # type: ignore[call-overload]
        if ids is not None:
            ids.pop(pending.id, None)
            if not ids:
                del index[name]  # type: ignore[arg-type]


def sent_phrase(times: int) -> str:
    """How an expired pop fared: "undelivered" (no listener of its key got it) or how many
    times it was sent without an ack."""
    if not times:
        return "undelivered"
    return "unacknowledged (sent once)" if times == 1 else f"unacknowledged (sent {times} times)"
