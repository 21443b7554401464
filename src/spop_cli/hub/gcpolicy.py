"""Keep long-lived objects (connections, registrations) out of the full garbage collections.

A full (generation 2) collection walks every tracked object: with 10,000 connections alive that
was a 35-53 ms pause of the whole hub, about once a second under load. What a connection holds
lives as long as the connection, so there is nothing for those collections to find in it.
`gc.freeze()` moves everything alive into the permanent generation, which collections skip.

The price: an object frozen and later part of unreachable cycles is not reclaimed (objects
without cycles still are, by reference counting, the moment the last reference goes). Freezing
happens only when the live connections reach a new high, so the frozen set is bounded by a few
times the peak; once half of the connections alive at the last freeze are gone, everything is
unfrozen, collected once and frozen again, so cycles left by closed connections are reclaimed.
"""

from __future__ import annotations

import gc

MIN_STEP = 500  # connections gained before a freeze is worth its pass
GROWTH = 1.1  # ... and at least a tenth more than at the last freeze


class FreezeOnGrowth:
    """`tick(live)` now and then (the hub's sweep, once a second); never blocks for long."""

    def __init__(self, min_step: int = MIN_STEP, growth: float = GROWTH) -> None:
        self.min_step = min_step
        self.growth = growth
        self.frozen_at = 0  # live connections at the last freeze
        self.freezes = 0
        self.thaws = 0

    def tick(self, live: int) -> None:
        if live >= max(self.frozen_at * self.growth, self.frozen_at + self.min_step):
            gc.collect(1)  # the young garbage goes first: frozen, its cycles would stay
            gc.freeze()
            self.frozen_at = live
            self.freezes += 1
        elif self.frozen_at >= self.min_step and live < self.frozen_at // 2:
            # many frozen connections are gone: one full collection reclaims their cycles
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.frozen_at = live
            self.thaws += 1
