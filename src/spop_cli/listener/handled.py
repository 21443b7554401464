"""The pop ids a listener has handled, remembered for a time, so a replayed pop runs nothing twice.

The hub replays a pop for as long as it is pending: until its ack is counted or `pop_ttl` after it
was accepted. An ack can be lost with its connection (or with a hub killed before it wrote the ack
down), so a listener must recognise any pop it handled within the last `pop_ttl`, however many it
handled since: a count-bounded memory forgets the oldest exactly when a big backlog comes back.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

DEFAULT_KEEP = 120.0  # seconds, when the hub does not say its pop_ttl (as an older hub)
MARGIN = 60.0  # seconds kept beyond the hub's pop_ttl: clocks, a restart's journal, a slow loop
MAX_IDS = 1_000_000  # a safety cap on memory (~120 MB): 8,000 pops/s to one desktop for 120 s
BUCKET = 1.0  # ids handled within one second share a time stamp


class HandledIds:
    """Ids handled in the last `keep` seconds (the first handling counts; a repeat refreshes
    nothing), at most `limit` of them (the oldest go first past it, and `overflowed` counts them)."""

    __slots__ = ("keep", "limit", "clock", "overflowed", "_ids", "_buckets")

    def __init__(
        self,
        keep: float = DEFAULT_KEEP + MARGIN,
        limit: int = MAX_IDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keep = keep
        self.limit = limit
        self.clock = clock
        self.overflowed = 0  # ids forgotten before their time because of `limit`
        self._ids: set[str] = set()
        self._buckets: deque[tuple[float, deque[str]]] = deque()  # oldest first

    def __contains__(self, pop_id: object) -> bool:
        return pop_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, pop_id: str) -> None:
        """Remember a newly handled id (an id already remembered keeps its first time)."""
        ids = self._ids
        if pop_id in ids:
            return
        now = self.clock()
        buckets = self._buckets
        if not buckets or now - buckets[-1][0] >= BUCKET:
            # old buckets go when a new one starts (at most once a second, not per pop): an id
            # is forgotten at most a bucket's span late, never early
            self._forget_before(now - self.keep)
            buckets.append((now, deque()))
        buckets[-1][1].append(pop_id)
        ids.add(pop_id)
        while len(ids) > self.limit:
            self._ids.discard(buckets[0][1].popleft())
            self.overflowed += 1
            if not buckets[0][1]:
                buckets.popleft()

    def _forget_before(self, horizon: float) -> None:
        buckets = self._buckets
        # a bucket's stamp is its first id's time; it goes once its last could have been added
        while buckets and buckets[0][0] + BUCKET <= horizon:
            self._ids.difference_update(buckets.popleft()[1])
