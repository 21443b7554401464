"""Nothing lost: a pop stays until a listener of its key acks it, its contact ends or it expires;
a listener gets what it missed and runs its callbacks once per pop; a resent id is one pop;
heartbeats find dead peers; a slow consumer neither grows the hub nor slows the others."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from typing import Any

import pytest

from hubproc import (
    Counting,
    HubProcess,
    RawClient,
    address_of,
    http_of,
    http_post,
    inprocess_hub,
    pop,
    run,
    until,
)
from spop_cli import client
from spop_cli.hub.connection import slow_limit
from spop_cli.hub.journal import Journal
from spop_cli.model import ListenerStatus

S = ListenerStatus


# -- kept until acked ------------------------------------------------------------------------


def test_pop_is_kept_until_a_listener_of_its_key_acks_it() -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            [pop_id] = await hub.publish(pop())
            first = await RawClient.open(hub.port)
            await first.hello()
            await first.request("register", media="telephone", resource="13579")
            assert (await first.frame())["pop"]["id"] == pop_id
            first.close()  # gone without an ack
            await until(lambda: not hub.delivery.routing.has(("telephone", "13579")))
            assert hub.status()["pending"] == 1

            # an ack from a listener of another key does not count
            stranger = await RawClient.open(hub.port)
            await stranger.hello()
            await stranger.request("register", media="email", resource="13579")
            await stranger.send({"op": "ack", "id": pop_id})
            await stranger.request("status")
            assert hub.status()["pending"] == 1
            stranger.close()

            second = await RawClient.open(hub.port)
            await second.hello()
            await second.request("register", media="telephone", resource="13579")
            assert (await second.frame())["pop"]["id"] == pop_id  # delivered again
            await second.send({"op": "ack", "id": pop_id})
            await second.request("status")
            assert hub.status()["pending"] == 0
            second.close()

            third = await RawClient.open(hub.port)
            await third.hello()
            await third.request("register", media="telephone", resource="13579")
            [marker] = await hub.publish(pop(source="marker"))
            assert (await third.frame())["pop"]["id"] == marker  # nothing came before it
            counters = hub.status()["counters"]
            assert counters["acked"] == 1 and counters["unknown_acks"] == 1
            third.close()

    run(body())


def test_contact_end_withdraws_its_pending_pops() -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            events = [
                {
                    "contact_id": "c1",
                    "event": "queued",
                    "media": "telephone",
                    "source": "12345",
                    "queue_name": "Ventes",
                },
                {"contact_id": "c1", "event": "routed", "resource": "13579"},
            ]
            assert len((await hub.apply_contacts(events))["pops"]) == 1
            await hub.publish(pop(contact_id="other", source="kept"))
            assert hub.status()["pending"] == 2
            await hub.apply_contacts([{"contact_id": "c1", "event": "ended"}])
            assert hub.status()["pending"] == 1 and hub.status()["counters"]["withdrawn"] == 1
            listener = await Counting().up(address_of(hub), "13579")
            assert await until(lambda: listener.sources == ["kept"])
            await asyncio.sleep(0.1)
            assert listener.sources == ["kept"]
            await listener.listener.shutdown()

    run(body())


def test_expired_pop_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with inprocess_hub(pop_ttl=0.3, heartbeat=0.2) as hub:
            [pop_id] = await hub.publish(pop())
            assert await until(lambda: hub.status()["counters"]["expired"] == 1, 5)
            assert hub.status()["pending"] == 0
            listener = await Counting().up(address_of(hub), "13579")
            await hub.publish(pop(source="fresh"))
            assert await until(lambda: listener.sources == ["fresh"])
            await listener.listener.shutdown()
        assert any(pop_id in r.getMessage() and "expired" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="spop.hub"):
        run(body())


# -- the listener's side: what it missed, once --------------------------------------------------


def test_listener_gets_what_it_missed_and_runs_callbacks_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first pop's ack is lost with the connection: it comes again, the callback does not."""
    dropping = threading.Event()
    real_send = client.HubLink.send

    def send(self: client.HubLink, data: bytes) -> None:
        if dropping.is_set() and b'"ack"' in data:
            return
        real_send(self, data)

    monkeypatch.setattr(client.HubLink, "send", send)

    async def body() -> None:
        async with inprocess_hub() as hub:
            listener = await Counting().up(address_of(hub), "13579")
            dropping.set()
            [first] = await hub.publish(pop(source="first"))
            assert await until(lambda: listener.calls[first] == 1)
            await asyncio.sleep(0.05)
            assert hub.status()["pending"] == 1  # its ack never left
            dropping.clear()
            for conn in list(hub.connections):  # the hub loses the connection
                conn.transport.abort()
            assert await until(lambda: listener.listener.status is S.Status_Reconnecting)
            [second] = await hub.publish(pop(source="second"))  # sent while it is away
            assert await until(lambda: hub.status()["pending"] == 0, 10)
            assert listener.listener.status is S.Status_Up
            assert listener.calls == {first: 1, second: 1}
            assert hub.status()["counters"]["delivered"] >= 3  # first went out twice
            await listener.listener.shutdown()

    run(body())


def test_reconnection_backs_off_with_jitter_capped_by_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[float] = []
    real_connect = client.connect

    async def counting_connect(*args: Any, **kwargs: Any) -> Any:
        attempts.append(time.monotonic())
        return await real_connect(*args, **kwargs)

    async def body() -> None:
        async with inprocess_hub() as hub:
            address, options = address_of(hub), dict(hub.config.__dict__)
            listener = await Counting(reconnecting_interval=0.4).up(address, "13579")
            monkeypatch.setattr(client, "connect", counting_connect)
            lost_at = time.monotonic()
            await hub.stop()  # nobody answers now
            assert await until(lambda: len(attempts) >= 9, 10)
            gaps = [b - a for a, b in zip([lost_at, *attempts], attempts, strict=False)]
            assert gaps[0] < 0.3  # starts short
            assert max(gaps) < 0.4 + 0.25  # never past the interval (plus a failed attempt)
            assert min(gaps[-4:]) >= 0.2 - 0.02  # at the cap: jitter between half and all of it
            assert len({round(g, 3) for g in gaps[-4:]}) > 1  # jittered, not in lockstep
            options["port"] = hub.port
            again = type(hub)(type(hub.config)(**options))
            await again.start()
            assert await until(lambda: listener.listener.status is S.Status_Up, 5)
            await listener.listener.shutdown()
            await again.stop()

    run(body())


# -- idempotent publishing ------------------------------------------------------------------------


def test_same_id_within_the_window_is_one_pop() -> None:
    async def body() -> None:
        async with inprocess_hub(dedupe_window=0.5, heartbeat=0.2) as hub:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            await raw.request("register", media="telephone", resource="13579")
            addr = address_of(hub)
            assert await client.publish(addr, pop(id="call-1/pop-1")) == ["call-1/pop-1"]
            assert (await raw.frame())["pop"]["id"] == "call-1/pop-1"
            # resent over the listener port and over HTTP, before and after the ack
            assert await client.publish(addr, pop(id="call-1/pop-1", source="resent")) == [
                "call-1/pop-1"
            ]
            await raw.send({"op": "ack", "id": "call-1/pop-1"})
            status, answer = await asyncio.to_thread(
                http_post, f"{http_of(hub)}/v1/pops", pop(id="call-1/pop-1")
            )
            assert status == 200 and answer["ids"] == ["call-1/pop-1"]
            assert hub.status()["counters"]["duplicates"] == 2
            assert hub.status()["counters"]["pops_accepted"] == 1
            await client.publish(addr, pop(source="marker"))
            assert (await raw.frame())["pop"]["source"] == "marker"  # no second copy before it
            # past the window the id is new again
            assert await until(lambda: not hub.delivery.is_duplicate("call-1/pop-1"), 5)
            assert await client.publish(addr, pop(id="call-1/pop-1", source="later")) == [
                "call-1/pop-1"
            ]
            assert (await raw.frame())["pop"]["source"] == "later"
            raw.close()

    run(body())


def test_a_resend_is_answered_only_once_the_first_copy_is_committed(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real_commit = Journal._commit

    def slow_commit(self: Journal, *args: Any) -> None:
        gate.wait(10)
        real_commit(self, *args)

    monkeypatch.setattr(Journal, "_commit", slow_commit)
    monkeypatch.setattr("spop_cli.hub.journal.INLINE_ROWS", -1)  # the slow commit in its thread

    async def body() -> None:
        async with inprocess_hub(journal=str(tmp_path / "j.sqlite3")) as hub:
            first = asyncio.ensure_future(hub.publish(pop(id="p1")))
            assert await until(lambda: "p1" in hub._held)  # waiting for its commit
            assert "p1" not in hub.delivery.pending  # not delivered before it either
            resend = asyncio.ensure_future(hub.publish(pop(id="p1")))
            await asyncio.sleep(0.3)
            assert not first.done() and not resend.done()  # neither answered before the commit
            gate.set()
            assert await first == await resend == ["p1"]

    run(body())


# -- liveness -------------------------------------------------------------------------------------


def test_welcome_carries_the_heartbeat_and_a_silent_peer_is_dropped() -> None:
    async def body() -> None:
        async with inprocess_hub(heartbeat=0.2) as hub:
            silent = await RawClient.open(hub.port)
            assert (await silent.hello())["heartbeat"] == 0.2
            alive = await RawClient.open(hub.port)
            await alive.hello()

            async def never_answer() -> tuple[int, float]:
                started, pings = time.monotonic(), 0
                while (frame := await silent.frame(pings=True)) is not None:
                    pings += frame["op"] == "ping"
                return pings, time.monotonic() - started

            async def answer_pings() -> None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(alive.frame(), 1.5)  # answers pings, gets nothing else

            (pings, silent_for), _ = await asyncio.gather(never_answer(), answer_pings())
            assert pings >= 1 and silent_for < 3.0  # ~3 heartbeats (0.6 s); generous bound
            assert hub.status()["counters"]["dead_peers"] == 1
            # a peer that answers its pings stays, however long it says nothing else
            assert hub.status()["connections"] == 1
            alive.close()

    run(body())


def test_listener_finds_a_frozen_hub_and_comes_back(tmp_path: Any) -> None:
    import signal

    with HubProcess(tmp_path, heartbeat=0.3) as hub:

        async def body() -> None:
            listener = await Counting(reconnecting_interval=0.3).up(hub.address, "13579")
            hub.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                assert await until(lambda: listener.listener.status is S.Status_Reconnecting, 5)
                assert time.monotonic() - started < 5  # three heartbeats is 0.9 s
            finally:
                hub.proc.send_signal(signal.SIGCONT)
            assert await until(lambda: listener.listener.status is S.Status_Up, 10)
            await client.publish(hub.address, pop(source="after"))
            assert await until(lambda: listener.sources == ["after"])
            await listener.listener.shutdown()

        run(body())


# -- slow consumers --------------------------------------------------------------------------------


async def frozen_desktop(hub: Any, resources: list[str]) -> socket.socket:
    """A desktop that registers `resources` on one connection, then never reads again, with a
    small receive window."""
    frozen = socket.socket()
    frozen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frozen.setblocking(False)
    await asyncio.get_running_loop().sock_connect(frozen, ("127.0.0.1", hub.port))
    frozen.sendall(
        b'{"op":"hello","version":1}\n'
        + b"".join(
            b'{"op":"register","media":"telephone","resource":"%s"}\n' % r.encode()
            for r in resources
        )
    )
    assert await until(lambda: all(hub.delivery.routing.has(("telephone", r)) for r in resources))
    return frozen


def test_slow_consumer_is_dropped_others_unharmed_and_it_resumes() -> None:
    async def body() -> None:
        # a window wider than the flood: the buffer limit, not the window, must stop it here
        async with inprocess_hub(max_buffer=64 * 1024, max_inflight=100_000) as hub:
            frozen = await frozen_desktop(hub, ["frozen"])
            other = await Counting().up(address_of(hub), "other")
            for start in range(0, 6000, 500):  # 6 MB: past the kernel's buffers too
                await hub.publish(
                    [
                        pop("frozen", contact_description=f"{i} " + "x" * 1000)
                        for i in range(start, start + 500)
                    ]
                )
                sent = time.monotonic()
                await hub.publish(pop("other", source=str(start)))
                assert await until(lambda start=start: str(start) in other.sources, 5)
                assert time.monotonic() - sent < 2.0  # generous: the frozen one slows nobody
            counters = hub.status()["counters"]
            assert counters["slow_consumers_dropped"] == 1
            assert hub.status()["pending"] == 6000  # kept for when it comes back
            frozen.close()
            back = await Counting().up(address_of(hub), "frozen")
            assert await until(lambda: len(back.calls) == 6000, 20), (len(back.calls), hub.status())
            assert back.twice() == []
            assert await until(lambda: hub.status()["pending"] == 0)
            for listener in (other, back):
                await listener.listener.shutdown()

    run(body())


@pytest.mark.parametrize(
    ("registrations", "limit"),
    [(0, 1), (1, 1), (2, 2), (63, 63), (64, 64), (65, 64), (1000, 64)],
)
def test_the_slow_consumer_limit_is_max_buffer_per_registration_up_to_64(
    registrations: int, limit: int
) -> None:
    assert slow_limit(1 << 20, registrations) == limit << 20


def test_a_shared_connection_is_dropped_past_max_buffer_per_registration_not_before() -> None:
    """Four listeners on one connection that stops reading: its unsent bytes pass one
    max_buffer and it stays; past four it is dropped, at the first frame over."""
    keys = [f"shared-{n}" for n in range(4)]
    max_buffer = 64 * 1024

    async def body() -> None:
        async with inprocess_hub(max_buffer=max_buffer, max_inflight=100_000) as hub:
            frozen = await frozen_desktop(hub, keys)
            (conn,) = [c for c in hub.connections if c.keys]
            # the kernel's buffers as small as they go: the unsent bytes wait in the hub
            conn.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
            alive: list[int] = []  # its unsent bytes after each pop, while it stays
            for n in range(200):  # 10 KB each: 2 MB, far past four times the limit
                data = {f"k{i}": "x" * 2500 for i in range(4)}
                await hub.publish(pop(keys[n % 4], contact_data=data))
                await asyncio.sleep(0.005)  # the hub's flush of this turn
                if conn.closed:
                    break
                alive.append(conn.transport.get_write_buffer_size())
            assert hub.status()["counters"]["slow_consumers_dropped"] == 1
            frame = 10_000 + 300  # a pop's frame, about
            assert max_buffer < alive[-1] <= 4 * max_buffer  # over one share, kept
            assert alive[-1] > 4 * max_buffer - 2 * frame  # dropped at the next frame
            assert hub.status()["pending"] == len(alive) + 1  # nothing lost
            frozen.close()

    run(body())


def test_a_backlog_larger_than_the_buffer_is_replayed_not_dropped() -> None:
    async def body() -> None:
        async with inprocess_hub(max_buffer=64 * 1024) as hub:
            # 6 MB pending: more than the kernel's socket buffers take at once
            await hub.publish([pop(contact_description="x" * 1000) for _ in range(6000)])
            listener = await Counting().up(address_of(hub), "13579")
            assert await until(lambda: len(listener.calls) == 6000, 20)
            assert hub.status()["counters"].get("slow_consumers_dropped", 0) == 0
            assert listener.twice() == []
            await listener.listener.shutdown()

    run(body())


# -- limits ----------------------------------------------------------------------------------------


def test_registration_and_connection_limits() -> None:
    async def body() -> None:
        async with inprocess_hub(max_registrations=3, max_connections=3) as hub:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            for resource in "123":
                assert (await raw.request("register", media="telephone", resource=resource))[
                    "op"
                ] == "ok"
            refused = await raw.request("register", media="telephone", resource="4")
            assert refused["code"] == "SCREENPOP_Cannot_Register" and "fatal" not in refused
            again = await raw.request("register", media="telephone", resource="1")
            assert again["code"] == "SCREENPOP_Already_Registered"
            others = [await RawClient.open(hub.port) for _ in range(2)]
            over = await RawClient.open(hub.port)
            frames = await over.frames_until_closed()
            assert [(f["code"], f["fatal"]) for f in frames] == [
                ("SCREENPOP_Memory_Allocation_Error", True)
            ]
            assert hub.status()["counters"]["refused_connections"] == 1
            for conn in (raw, *others):
                conn.close()

    run(body())


def test_thousands_of_idle_connections_time_out_and_others_are_served() -> None:
    async def body() -> None:
        async with inprocess_hub(handshake_timeout=0.5, heartbeat=0.5) as hub:
            idle = [await RawClient.open(hub.port) for _ in range(2000)]
            listener = await Counting().up(address_of(hub), "13579")
            await hub.publish(pop(source="through"))
            assert await until(lambda: listener.sources == ["through"], 5)
            answers = await asyncio.gather(*(conn.frames_until_closed(10) for conn in idle))
            assert all(
                frames
                == [
                    {
                        "op": "error",
                        "code": "SCREENPOP_Initialization_Error",
                        "message": "no hello in time",
                        "fatal": True,
                    }
                ]
                for frames in answers
            )
            assert hub.status()["connections"] == 1
            for conn in idle:
                conn.close()
            assert listener.listener.status is S.Status_Up
            await listener.listener.shutdown()

    run(body())


def test_each_pending_pop_expires_at_its_own_time_whatever_the_order_it_came_in() -> None:
    """The sweep looks only at what is due (a heap by expiry): a pop restored with an earlier
    expiry than the ones published before it still goes at its time, and not a moment before."""
    from spop_cli.hub.delivery import InProcessDelivery

    now = [1000.0]
    delivery = InProcessDelivery(ttl=120, clock=lambda: now[0])
    key = ("telephone", "13579")
    delivery.publish("late", key, b"{}", expires=1100.0)
    delivery.publish("early", key, b"{}", expires=1010.0)
    delivery.publish("default", key, b"{}")  # now + ttl = 1120
    delivery.publish("acked", key, b"{}", expires=1005.0)
    delivery.ack("acked")
    now[0] = 1009.999
    assert delivery.expire() == []
    now[0] = 1010.0
    assert [p.id for p in delivery.expire()] == ["early"]
    now[0] = 1099.999
    assert delivery.expire() == []
    now[0] = 1100.0
    assert [p.id for p in delivery.expire()] == ["late"]
    now[0] = 1120.0
    assert [p.id for p in delivery.expire()] == ["default"]
    assert delivery.expired == 3 and not delivery.pending
