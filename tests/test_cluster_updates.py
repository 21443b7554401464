"""The NATS backend's contact updates, expiries and acks: real nats-server, real hubs, real
listeners. docs/cluster.md."""

from __future__ import annotations

import logging
import threading
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import HubThread, wait_for
from hubproc import RawClient, address_of, inprocess_hub, run, until
from natsproc import NatsCluster
from spop_cli import ListenerStatus, ScreenPopTelephoneListener
from spop_cli.hub.nats_delivery import _headers, subject
from spop_cli.scenario import builtin_names, load_scenario
from test_contact_updates import ANSWERED_ELSEWHERE, EXPECTED, Follower, played, quiet

S = ListenerStatus


@pytest.fixture
def nats1(tmp_path: Path) -> Any:
    cluster = NatsCluster(tmp_path, 1)
    yield cluster
    cluster.close()


async def settled(hubs: list[Any]) -> None:
    """Every registered key's history read, everything in the stream followed by every hub,
    delivered, acked, and the acks stored."""

    async def last() -> int:
        return (await hubs[0].delivery.js.stream_info(hubs[0].config.nats_stream)).state.last_seq

    while True:
        seq = await last()
        assert await until(
            lambda seq=seq: all(
                all(state.synced for state in h.delivery._keys.values())
                and h.delivery.last_seq >= seq
                and not h.delivery.pending
                and not h.delivery._acks_out
                for h in hubs
            ),
            10,
        ), [h.status()["counters"] for h in hubs]
        if await last() == seq:
            return


def suffixed(events: list[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    """The scenario's events for a contact of its own (the bucket outlives a scenario)."""
    return [{**e, "contact_id": e["contact_id"] + suffix} for e in events]


async def play(hubs: list[Any], name: str, suffix: str) -> dict[str, list[tuple[Any, ...]]]:
    """Listeners with updates for each resource of the scenario, on the hubs in turn; the
    events to the hubs in turn, each delivered and acked before the next. What each saw."""
    media = load_scenario(name).expect[0]["media"]
    followers: dict[str, Follower] = {}
    try:
        for index, resource in enumerate(EXPECTED[name]):
            hub = hubs[index % len(hubs)]
            followers[resource] = await Follower(media).up(address_of(hub), resource)
        for index, event in enumerate(suffixed(played(name), suffix)):
            await hubs[index % len(hubs)].apply_contacts(event)
            if hubs[0].clustered:
                await settled(hubs)
            else:
                await quiet(hubs[0])
        assert all(n == 1 for f in followers.values() for n in f.calls.values()), name
        return {r: f.seen for r, f in followers.items()}
    finally:
        for follower in followers.values():
            await follower.down()


def test_a_contact_alternating_between_hubs_updates_as_on_one_hub(nats1: NatsCluster) -> None:
    """Every scenario: events to hub A, B, A, …, listeners with updates on A and B: the same
    pops and change frames, in order, as one embedded hub gives."""

    async def body() -> None:
        async with AsyncExitStack() as stack:
            embedded = await stack.enter_async_context(inprocess_hub())
            a = await stack.enter_async_context(
                inprocess_hub(backend="nats", nats_servers=nats1.servers)
            )
            b = await stack.enter_async_context(
                inprocess_hub(backend="nats", nats_servers=nats1.servers)
            )
            for name in builtin_names():
                alone = await play([embedded], name, "-alone")
                shared = await play([a, b], name, "-shared")
                assert shared == alone == EXPECTED[name], name
            changes = sum(
                1 for seen in EXPECTED.values() for s in seen.values() for x in s if x[0] != "pop"
            )
            counters = [h.status()["counters"] for h in (a, b)]
            assert sum(c["changes_accepted"] for c in counters) == changes
            assert sum(c["changes_delivered"] for c in counters) == changes
            assert sum(c["changes_acked"] for c in counters) == changes
            assert [c["changes_pending"] for c in counters] == [0, 0]
            assert [c["nats_ack_failures"] for c in counters] == [0, 0]

    run(body(), 300)


def test_answered_elsewhere_withdraws_the_pop_on_the_other_hub(nats1: NatsCluster) -> None:
    """Ringall across hubs: 1002's pop (no listener anywhere) is taken back when 1001 answers
    via hub A; 1002's listener, coming later to hub B, gets `withdrawn` and no pop."""

    def event(kind: str, second: int, **fields: Any) -> dict[str, Any]:
        return {
            "contact_id": "ring",
            "event": kind,
            "at": f"2024-05-14T09:00:{second:02d}Z",
        } | fields

    async def body() -> None:
        async with AsyncExitStack() as stack:
            a, b = [
                await stack.enter_async_context(
                    inprocess_hub(backend="nats", nats_servers=nats1.servers)
                )
                for _ in range(2)
            ]
            here = await Follower().up(address_of(a), "1001")
            try:
                await b.apply_contacts(event("routed", 0, resource="1001"))
                await a.apply_contacts(event("routed", 0, resource="1002"))
                await settled([a])
                await b.apply_contacts(event("answered", 5, resource="1001"))
                await settled([a])
                late = await Follower().up(address_of(b), "1002")
                await settled([a, b])
                assert late.seen == ANSWERED_ELSEWHERE
                assert here.seen == [
                    ("pop", "1001"),
                    ("answered", "1001", {"answered_by": "1001", "talk_time": 0, "wait_time": 0}),
                ]
                assert b.status()["counters"]["withdrawn"] == 1
                await late.down()
            finally:
                await here.down()

    run(body())


def test_ended_on_the_listeners_hub_withdraws_its_unacked_pop_as_withdrawn(
    nats1: NatsCluster,
) -> None:
    """The pop is in flight, unacked, on hub A when A applies `ended`: the update says
    `withdrawn` (reason ended), as on one embedded hub, not `ended`."""

    async def body() -> None:
        async with inprocess_hub(backend="nats", nats_servers=nats1.servers) as a:
            raw = await RawClient.open(a.port)
            await raw.send({"op": "hello", "ref": 0, "version": 2, "updates": True})
            assert (await raw.frame())["op"] == "welcome"  # type: ignore[index]
            assert (await raw.request("register", media="telephone", resource="1001"))["op"] == "ok"
            await settled([a])
            at = "2024-05-14T09:00:{:02d}Z"
            await a.apply_contacts(
                {"contact_id": "c", "event": "routed", "resource": "1001", "at": at.format(0)}
            )
            pop = await raw.frame()
            assert pop is not None and pop["op"] == "pop"
            await a.apply_contacts({"contact_id": "c", "event": "ended", "at": at.format(9)})
            change = await raw.frame()
            assert change is not None and change["op"] == "change"
            body_ = change["change"]
            assert (body_["change"], body_["reason"], body_["pop_id"]) == (
                "withdrawn",
                "ended",
                pop["pop"]["id"],
            )
            await raw.send({"op": "ack", "ids": [body_["id"]]})
            assert await until(lambda: not a.delivery.pending)
            counters = a.status()["counters"]
            assert (counters["withdrawn"], counters["acked"], counters["changes_acked"]) == (
                1,
                0,
                1,
            )
            raw.close()

    run(body())


def test_expiry_is_counted_and_logged_once_by_the_hub_that_accepted(
    nats1: NatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A pop nobody listens to, and one delivered on hub B and never acked: hub A accepted
    both; A counts and logs each expiry once, B neither."""
    a = HubThread(backend="nats", nats_servers=nats1.servers, pop_ttl=1.0)
    b = HubThread(backend="nats", nats_servers=nats1.servers, pop_ttl=1.0)
    release = threading.Event()
    try:
        listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
        got: list[str] = []

        @listener.on_screen_pop
        def on_pop(event: Any) -> None:
            got.append(event.id)
            release.wait(30)  # no ack until the test ends

        listener.initialize(b.address)
        listener.start_listening("2")
        assert wait_for(lambda: b.status()["registrations"] == 1)
        with caplog.at_level(logging.WARNING, logger="spop.hub"):
            a.publish({"id": "nobody", "media": "telephone", "resource": "1"})
            a.publish({"id": "unacked", "media": "telephone", "resource": "2"})
            assert wait_for(lambda: got == ["unacked"])
            assert wait_for(lambda: a.status()["counters"]["expired"] == 2)
            assert wait_for(lambda: b.status()["pending"] == 0)
        lines = [r.getMessage() for r in caplog.records if "expired" in r.getMessage()]
        assert sorted(lines) == [
            f"pop {pop_id} for telephone {r} expired unacknowledged (no listener of its key on"
            " this hub, which accepted it) after 1 s"
            for pop_id, r in (("nobody", "1"), ("unacked", "2"))
        ]
        assert b.status()["counters"]["expired"] == 0
        assert a.hub is not None and not a.hub.delivery._mine
        release.set()
        listener.shutdown()
    finally:
        release.set()
        a.close()
        b.close()


def test_a_stored_ack_is_not_replayed_to_a_listener_moving_hubs(nats1: NatsCluster) -> None:
    """The listener acks while NATS is down: the ack is not confirmed in time (counted), is
    sent again, and stored once NATS is back. The listener then moves to hub B, which reads the
    key's history: the acked pop does not come again."""
    a = HubThread(backend="nats", nats_servers=nats1.servers, nats_timeout=0.5)
    b = HubThread(backend="nats", nats_servers=nats1.servers, nats_timeout=0.5)
    try:
        release = threading.Event()
        got: list[str] = []
        listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)

        @listener.on_screen_pop
        def on_pop(event: Any) -> None:
            got.append(event.id)
            release.wait(30)  # acked when this returns

        listener.initialize(f"{a.address},{b.address}")
        listener.start_listening("9")
        assert wait_for(lambda: a.status()["registrations"] == 1)
        b.publish({"id": "p1", "media": "telephone", "resource": "9"})
        assert wait_for(lambda: got == ["p1"])
        nats1.nodes[0].kill()
        release.set()  # the ack reaches hub A while NATS is away
        assert wait_for(lambda: a.status()["counters"]["acked"] == 1)
        assert wait_for(lambda: a.status()["counters"]["nats_ack_failures"] == 1)
        nats1.nodes[0].start()
        assert wait_for(lambda: a.status()["counters"]["nats_acks_stored"] == 1, timeout=30)
        a.stop()
        assert wait_for(lambda: listener.status is S.Status_Up and b.status()["registrations"] == 1)
        b.publish({"id": "p2", "media": "telephone", "resource": "9"})
        assert wait_for(lambda: got == ["p1", "p2"])
        assert b.status()["counters"]["delivered"] == 1
        listener.shutdown()
    finally:
        a.close()
        b.close()


def test_acks_are_confirmed_and_counted(nats1: NatsCluster) -> None:
    hub = HubThread(backend="nats", nats_servers=nats1.servers)
    try:
        listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
        got: list[str] = []
        listener.on_screen_pop(lambda event: got.append(event.id))
        listener.initialize(hub.address)
        listener.start_listening("5")
        hub.publish([{"id": f"p{n}", "media": "telephone", "resource": "5"} for n in range(50)])
        assert wait_for(lambda: hub.status()["counters"]["nats_acks_stored"] == 50)
        counters = hub.status()["counters"]
        assert (counters["acked"], counters["nats_ack_failures"], counters["pending"]) == (50, 0, 0)
        assert got == [f"p{n}" for n in range(50)]
        listener.shutdown()
    finally:
        hub.close()


async def _stream_acks(hub: HubThread) -> tuple[list[list[str]], int]:
    """The ack batches in the stream (each message's ids) and the count of one-ack messages."""
    assert hub.hub is not None
    delivery = hub.hub.delivery
    info = await delivery.js.stream_info(delivery.stream, subjects_filter="spop.>")
    subjects = info.state.subjects or {}
    batches, seq = [], 1
    while True:
        msg = await delivery._next(seq, "spop.acks", "acks", lambda: True)
        if msg is None:
            break
        batches.append(orjson.loads(msg.data))
        seq = int(msg.headers["Nats-Sequence"]) + 1
    return batches, sum(n for s, n in subjects.items() if s.startswith("spop.ack."))


def test_acks_go_to_the_stream_in_batches(nats1: NatsCluster) -> None:
    """A listener's acks leave the hub as ack batches (`spop.acks`): every acked id exactly
    once, no message per ack on the key's subject."""
    hub = HubThread(backend="nats", nats_servers=nats1.servers)
    try:
        listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
        listener.on_screen_pop(lambda event: None)
        listener.initialize(hub.address)
        listener.start_listening("5")
        assert wait_for(lambda: hub.status()["registrations"] == 1)
        hub.publish([{"id": f"p{n}", "media": "telephone", "resource": "5"} for n in range(50)])
        assert wait_for(lambda: hub.status()["counters"]["nats_acks_stored"] == 50)
        batches, single = hub.call(_stream_acks(hub))
        assert sorted(i for batch in batches for i in batch) == sorted(f"p{n}" for n in range(50))
        assert single == 0
        listener.shutdown()
    finally:
        hub.close()


def test_a_hub_started_later_knows_the_acks_already_stored(nats1: NatsCluster) -> None:
    """Hub B starts after hub A's listener acked p1 and p2 (B reads the ack batches already in
    the stream); a listener of the same key on B gets only what comes next."""
    a = HubThread(backend="nats", nats_servers=nats1.servers)
    b = None
    try:
        first = ScreenPopTelephoneListener(reconnecting_interval=0.3)
        first.on_screen_pop(lambda event: None)
        first.initialize(a.address)
        first.start_listening("6")
        assert wait_for(lambda: a.status()["registrations"] == 1)
        a.publish([{"id": f"p{n}", "media": "telephone", "resource": "6"} for n in (1, 2)])
        assert wait_for(lambda: a.status()["counters"]["nats_acks_stored"] == 2)
        b = HubThread(backend="nats", nats_servers=nats1.servers)
        got: list[str] = []
        second = ScreenPopTelephoneListener(reconnecting_interval=0.3)
        second.on_screen_pop(lambda event: got.append(event.id))
        second.initialize(b.address)
        second.start_listening("6")
        assert wait_for(lambda: b.status()["registrations"] == 1)
        a.publish({"id": "p3", "media": "telephone", "resource": "6"})
        assert wait_for(lambda: got == ["p3"])
        assert wait_for(lambda: b.status()["counters"]["pending"] == 0)
        assert b.status()["counters"]["delivered"] == 1
        first.shutdown()
        second.shutdown()
    finally:
        a.close()
        if b is not None:
            b.close()


def test_an_ack_from_a_hub_before_batched_acks_still_counts(nats1: NatsCluster) -> None:
    """A hub of an earlier version writes one ack per message on the key's subject
    (`spop.ack.<media>.<resource>`): the pop leaves the window here too."""
    hub = HubThread(backend="nats", nats_servers=nats1.servers)
    try:
        released = threading.Event()
        listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
        listener.on_screen_pop(lambda event: released.wait(30))  # does not ack yet
        listener.initialize(hub.address)
        listener.start_listening("7")
        assert wait_for(lambda: hub.status()["registrations"] == 1)
        hub.publish({"id": "old", "media": "telephone", "resource": "7"})
        assert wait_for(lambda: hub.status()["counters"]["pending"] == 1)
        assert hub.hub is not None
        delivery = hub.hub.delivery
        hub.call(delivery.js.publish(subject("ack", ("telephone", "7")), b"old"))
        assert wait_for(lambda: hub.status()["counters"]["pending"] == 0)
        released.set()
        listener.shutdown()
    finally:
        hub.close()


def test_stream_headers_are_read_as_nats_py_reads_them() -> None:
    raw = (
        "NATS/1.0\r\nSpop-Id: p:1\r\nSpop-Contact: Zoë 1\r\nSpop-Expires:12.500\r\n"
        "Nats-Msg-Id:  p:1 \r\nbroken line\r\n\r\n"
    ).encode()
    assert _headers(raw) == {
        "Spop-Id": "p:1",
        "Spop-Contact": "Zoë 1",
        "Spop-Expires": "12.500",
        "Nats-Msg-Id": "p:1",
    }


def test_the_live_stream_and_the_answers_take_the_direct_path(nats1: NatsCluster) -> None:
    """With the nats-py this project installs, the live consumer's messages and JetStream's
    answers are read by the hub's own path (a nats-py whose internals differ falls back to
    its callbacks, logged): a pop still goes round."""
    hub = HubThread(backend="nats", nats_servers=nats1.servers)
    try:
        assert hub.hub is not None
        delivery = hub.hub.delivery
        assert delivery.nc._process_msg.__qualname__.endswith("_direct_reads.<locals>.process_msg")
        listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
        got: list[str] = []
        listener.on_screen_pop(lambda event: got.append(event.id))
        listener.initialize(hub.address)
        listener.start_listening("8")
        assert wait_for(lambda: hub.status()["registrations"] == 1)
        hub.publish({"id": "direct", "media": "telephone", "resource": "8"})
        assert wait_for(lambda: got == ["direct"])
        assert wait_for(lambda: hub.status()["counters"]["nats_acks_stored"] == 1)
        listener.shutdown()
    finally:
        hub.close()
