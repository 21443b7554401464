"""Listeners sharing one hub connection (a `LinkPool`): the connection count, demultiplexing,
twins, the hub's limit, a hub restart, leaving, and the acks of one read in one frame."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from hubproc import address_of, inprocess_hub, loops, on, pop, run, until
from spop_cli import LinkPool, ListenerStatus
from spop_cli.listener.core import AsyncListener
from spop_cli.model import Error, ScreenPopError
from spop_cli.protocol import pop_frame
from test_listener_acks import BlockingHub, _pop

S = ListenerStatus


class Desk:
    """A listener of the pool and the pop ids its callback saw, in order."""

    def __init__(
        self, pool: LinkPool, resource: str, media: str = "telephone", **options: Any
    ) -> None:
        self.resource = resource
        self.listener = AsyncListener(media, pool=pool, reconnecting_interval=0.3, **options)
        self.seen: list[str] = []
        self.listener.on_screen_pop(lambda event: self.seen.append(event.id))

    async def start(self, address: str) -> Desk:
        await self.listener.initialize(address)
        await self.listener.start_listening(self.resource)
        return self


@pytest.mark.parametrize("runner", loops())
def test_listeners_of_a_pool_share_one_connection_and_get_their_own_pops(runner: Any) -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            pool = LinkPool()
            desks = [await Desk(pool, r).start(address_of(hub)) for r in ("101", "102", "103")]
            desks.append(await Desk(pool, "101", media="email").start(address_of(hub)))
            status = hub.status()
            assert (status["connections"], status["registrations"]) == (1, 4)
            assert pool.connections == 1
            for resource in ("103", "101", "102", "101"):
                await hub.publish(pop(resource, source=f"to-{resource}"))
            await hub.publish(pop("101", media="email"))
            assert await until(lambda: sum(len(d.seen) for d in desks) == 5)
            assert [len(d.seen) for d in desks] == [2, 1, 1, 1]
            assert await until(lambda: hub.status()["pending"] == 0)  # every ack counted
            for desk in desks:
                await desk.listener.shutdown()
            assert await until(lambda: hub.status()["connections"] == 0)
            assert pool.connections == 0

    on(runner, body())


def test_the_last_listener_to_leave_closes_the_connection() -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            pool = LinkPool()
            one, two = [await Desk(pool, r).start(address_of(hub)) for r in ("201", "202")]
            await one.listener.shutdown()
            assert one.listener.status is S.Status_Down
            status = hub.status()
            assert (status["connections"], status["registrations"]) == (1, 1)
            await hub.publish(pop("202"))
            await hub.publish(pop("201"))  # nobody listens to 201 any more: it stays pending
            assert await until(lambda: len(two.seen) == 1)
            assert await until(lambda: hub.status()["pending"] == 1)
            assert one.seen == []
            # stop, then listen to another resource on the same shared connection
            await two.listener.stop_listening()
            await two.listener.start_listening("201")
            assert await until(lambda: len(two.seen) == 2)
            await two.listener.shutdown()
            assert await until(lambda: hub.status()["connections"] == 0)

    run(body())


@pytest.mark.parametrize("runner", loops())
def test_twin_listeners_in_one_pool_get_a_connection_each(runner: Any) -> None:
    """The hub takes a (media, resource) once per connection: the second moves to another."""

    async def body() -> None:
        async with inprocess_hub() as hub:
            pool = LinkPool()
            first = await Desk(pool, "301").start(address_of(hub))
            twin = await Desk(pool, "301").start(address_of(hub))
            other = await Desk(pool, "302").start(address_of(hub))
            assert twin.listener.status is S.Status_Up
            status = hub.status()
            assert (status["connections"], status["registrations"]) == (2, 3)
            await hub.publish(pop("301", id="both"))
            assert await until(lambda: first.seen == ["both"] and twin.seen == ["both"])
            assert other.seen == []
            for desk in (first, twin, other):
                await desk.listener.shutdown()

    on(runner, body())


@pytest.mark.parametrize(
    ("per_link", "hub_limit", "connections"), [(2, 10_000, 3), (1000, 2, 3), (1000, 5, 1)]
)
def test_a_connection_holds_at_most_the_pool_s_and_the_hub_s_limit(
    per_link: int, hub_limit: int, connections: int
) -> None:
    """Five listeners: two per connection (the pool's limit, or the hub's `max_registrations`
    from its welcome) need three connections; a limit of five takes them all on one."""

    async def body() -> None:
        async with inprocess_hub(max_registrations=hub_limit) as hub:
            pool = LinkPool(per_link=per_link)
            desks = [await Desk(pool, f"40{i}").start(address_of(hub)) for i in range(5)]
            assert [d.listener.status for d in desks] == [S.Status_Up] * 5
            status = hub.status()
            assert (status["connections"], status["registrations"]) == (connections, 5)
            for i in range(5):
                await hub.publish(pop(f"40{i}", id=f"p{i}"))
            assert await until(lambda: [d.seen for d in desks] == [[f"p{i}"] for i in range(5)])
            for desk in desks:
                await desk.listener.shutdown()

    run(body())


def test_a_pool_must_hold_at_least_one_listener_per_connection() -> None:
    with pytest.raises(ValueError, match="per_link must be at least 1"):
        LinkPool(per_link=0)


@pytest.mark.parametrize("runner", loops())
def test_after_a_hub_restart_all_come_back_on_one_connection_and_nothing_is_lost(
    runner: Any, tmp_path: Path
) -> None:
    async def body() -> None:
        journal = str(tmp_path / "journal.sqlite3")
        async with inprocess_hub(journal=journal) as hub:
            port = hub.port
            pool = LinkPool()
            desks = [await Desk(pool, f"50{i}").start(address_of(hub)) for i in range(4)]
            statuses: list[S] = []
            desks[0].listener.on_status_changed(lambda old, new: statuses.append(new))
        # the hub is gone: pops accepted by the next hub while they reconnect
        assert await until(lambda: all(d.listener.status is S.Status_Reconnecting for d in desks))
        async with inprocess_hub(journal=journal, port=port) as hub:
            for i in range(4):
                await hub.publish(pop(f"50{i}", id=f"after-{i}"))
            assert await until(lambda: all(d.listener.status is S.Status_Up for d in desks), 10)
            assert await until(
                lambda: [d.seen for d in desks] == [[f"after-{i}"] for i in range(4)]
            )
            status = hub.status()
            assert (status["connections"], status["registrations"]) == (1, 4)
            assert await until(lambda: hub.status()["pending"] == 0)
            assert statuses == [S.Status_Reconnecting, S.Status_Up]
            for desk in desks:
                await desk.listener.shutdown()

    on(runner, body())


@pytest.mark.parametrize("runner", loops())
def test_a_pop_replayed_to_a_shared_connection_runs_once(runner: Any, tmp_path: Path) -> None:
    """Acks lost with the connection: the hub replays, the listeners ack again, run nothing twice."""

    async def body() -> None:
        journal = str(tmp_path / "journal.sqlite3")
        async with inprocess_hub(journal=journal) as hub:
            port = hub.port
            pool = LinkPool()
            desks = [await Desk(pool, f"60{i}").start(address_of(hub)) for i in range(3)]
            # drop every ack this connection would send: the pops stay pending in the journal
            [shared] = [s for links in pool._links.values() for s in links]
            assert shared.link is not None
            shared.link.send = lambda data: None  # type: ignore[method-assign]
            for i in range(3):
                await hub.publish(pop(f"60{i}", id=f"once-{i}"))
            assert await until(lambda: [d.seen for d in desks] == [[f"once-{i}"] for i in range(3)])
            assert hub.status()["pending"] == 3
        async with inprocess_hub(journal=journal, port=port) as hub:
            assert await until(lambda: all(d.listener.status is S.Status_Up for d in desks), 10)
            assert await until(lambda: hub.status()["pending"] == 0)  # replayed, acked
            assert [d.seen for d in desks] == [[f"once-{i}"] for i in range(3)]
            for desk in desks:
                await desk.listener.shutdown()

    on(runner, body())


def test_an_unreachable_hub_fails_every_listener_with_its_own_error() -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            port = hub.port
        pool = LinkPool()
        results = await asyncio.gather(
            *(
                AsyncListener("telephone", pool=pool).initialize(f"{port}@127.0.0.1")
                for _ in range(3)
            ),
            return_exceptions=True,
        )
        assert [type(r) for r in results] == [ScreenPopError] * 3
        assert [r.code for r in results] == [Error.SCREENPOP_Cannot_Find_HiPath_ProCenter] * 3  # type: ignore[union-attr]
        assert len({id(r) for r in results}) == 3
        assert pool.connections == 0

    run(body())


def test_the_acks_of_one_read_leave_as_one_frame() -> None:
    hub = BlockingHub()
    seen: list[str] = []

    async def main() -> None:
        pool = LinkPool()
        listeners = []
        for resource in ("4711", "4712"):
            listener = AsyncListener("telephone", pool=pool)
            listener.on_screen_pop(lambda event: seen.append(f"{event.resource}:{event.id}"))
            await listener.initialize(f"{hub.port}@127.0.0.1")
            await listener.start_listening(resource)
            listeners.append(listener)
        [shared] = [s for links in pool._links.values() for s in links]
        assert shared.link is not None
        other = {**_pop("p-2"), "resource": "4712"}
        # one read with a pop for each listener, then the loop blocked: both acks left in the read
        shared.link.data_received(
            pop_frame(_pop("p-1")) + pop_frame(other) + pop_frame(_pop("p-3"))
        )
        assert hub.got_ack.wait(5.0)
        for listener in listeners:
            await listener.shutdown()

    asyncio.run(main())
    assert seen == ["4711:p-1", "4712:p-2", "4711:p-3"]
    assert hub.ack_frames == [["p-1", "p-3", "p-2"]]


def test_before_acks_runs_before_each_batch_of_acks_leaves() -> None:
    """`spop listen --json` flushes stdout there: each line out before its pop is acked."""
    hub = BlockingHub()
    events: list[str] = []

    async def main() -> None:
        pool = LinkPool(before_acks=lambda: events.append(f"flush after {len(hub.acked)} acks"))
        listener = AsyncListener("telephone", pool=pool)
        listener.on_screen_pop(lambda event: events.append(event.id))
        await listener.initialize(f"{hub.port}@127.0.0.1")
        await listener.start_listening("4711")
        [shared] = [s for links in pool._links.values() for s in links]
        assert shared.link is not None
        shared.link.data_received(pop_frame(_pop("p-1")) + pop_frame(_pop("p-2")))
        assert hub.got_ack.wait(5.0)
        await listener.shutdown()

    asyncio.run(main())
    assert events == ["p-1", "p-2", "flush after 0 acks"]
    assert hub.ack_frames == [["p-1", "p-2"]]


def test_before_acks_needs_the_session_s_own_listeners() -> None:
    from spop_cli.session import ListenSession

    with pytest.raises(ValueError, match="before_acks needs the session's own listeners"):
        ListenSession(
            [], address="6000@127.0.0.1", listener_factory=AsyncListener, before_acks=print
        )
