"""Several hubs in one address (`6000@hub-a,6000@hub-b`): parsing, and a listener that fails over."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from conftest import HubThread, wait_for
from spop_cli import ListenerStatus, ScreenPopError, ScreenPopTelephoneListener
from spop_cli.address import Address, parse_addresses
from spop_cli.client import connect
from spop_cli.config import validate
from spop_cli.listener.core import AsyncListener
from spop_cli.model import Error

S = ListenerStatus


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("6000@hub-a", [Address("hub-a", 6000)]),
        ("6000@hub-a,6001@hub-b", [Address("hub-a", 6000), Address("hub-b", 6001)]),
        (
            " 6000@a , b:7000 ,[::1]:6002",
            [Address("a", 6000), Address("b", 7000), Address("::1", 6002)],
        ),
        ("a,b,c", [Address("a", 6000), Address("b", 6000), Address("c", 6000)]),
    ],
)
def test_address_lists(text: str, expected: list[Address]) -> None:
    assert parse_addresses(text) == expected


@pytest.mark.parametrize(
    "text", ["", "6000@a,", ",6000@a", "6000@a,,6000@b", "6000@a,x@b", "6000@a, "]
)
def test_bad_address_lists_are_initialization_errors(text: str) -> None:
    with pytest.raises(ScreenPopError) as info:
        parse_addresses(text)
    assert info.value.code is Error.SCREENPOP_Initialization_Error


def test_config_accepts_an_address_list() -> None:
    assert validate({"server": {"address": "6000@a,6000@b"}}) == []
    problems = validate({"server": {"address": "6000@a,,6000@b"}})
    assert [p.path for p in problems] == ["server.address"]
    assert "SCREENPOP_Initialization_Error" in problems[0].message


def test_initialize_skips_a_hub_that_is_down(hub: HubThread) -> None:
    listener = ScreenPopTelephoneListener(reconnecting_interval=0.2)
    listener.initialize(f"{free_port()}@127.0.0.1,{hub.address}")
    assert listener.status is S.Status_Idle
    listener.start_listening("13579")
    assert listener.status is S.Status_Up
    listener.shutdown()


def test_initialize_with_no_hub_up_is_cannot_find() -> None:
    listener = ScreenPopTelephoneListener()
    with pytest.raises(ScreenPopError) as info:
        listener.initialize(f"{free_port()}@127.0.0.1,{free_port()}@127.0.0.1")
    assert info.value.code is Error.SCREENPOP_Cannot_Find_HiPath_ProCenter
    assert listener.status is S.Status_Down


def test_a_source_reaches_the_second_hub(hub: HubThread) -> None:
    async def run() -> None:
        link = await connect(f"{free_port()}@127.0.0.1,{hub.address}", role="source")
        link.close()

    asyncio.run(run())


def test_listener_fails_over_to_the_other_hub_and_gets_its_pops() -> None:
    """Hub A stops: within the reconnect interval the listener is Up on hub B, pops flow there,
    and it does not go back to A (tried last) while B serves."""
    a, b = HubThread(), HubThread()
    try:
        listener = ScreenPopTelephoneListener(reconnecting_interval=0.5)
        pops: list[str] = []
        got = threading.Event()

        @listener.on_screen_pop
        def on_pop(event) -> None:  # type: ignore[no-untyped-def]
            pops.append(event.id)
            got.set()

        listener.initialize(f"{a.address},{b.address}")
        listener.start_listening("13579")
        assert a.status()["registrations"] == 1
        assert b.status()["registrations"] == 0
        # a pop waiting on B before the loss is replayed when the listener registers there
        b.publish({"id": "waiting-on-b", "media": "telephone", "resource": "13579"})
        a.stop()
        lost = time.monotonic()
        assert wait_for(lambda: listener.status is S.Status_Up and b.status()["registrations"] == 1)
        assert time.monotonic() - lost < 10  # generous on a loaded machine; the interval is 0.5 s
        assert wait_for(lambda: pops == ["waiting-on-b"])
        b.publish({"id": "live-on-b", "media": "telephone", "resource": "13579"})
        assert wait_for(lambda: pops == ["waiting-on-b", "live-on-b"])
        assert wait_for(lambda: b.status()["pending"] == 0)  # both acked to B
        listener.shutdown()
    finally:
        a.close()
        b.close()


def test_failover_replays_without_running_callbacks_twice() -> None:
    """The same pop id on both hubs (a pop the listener handled on A, replayed by B): the
    handled-id memory runs the callback once and acks it on B."""
    a, b = HubThread(), HubThread()

    async def run() -> list[str]:
        listener = AsyncListener("telephone", reconnecting_interval=0.3)
        seen: list[str] = []
        listener.on_screen_pop(lambda event: seen.append(event.id))
        await listener.initialize(f"{a.address},{b.address}")
        await listener.start_listening("24680")
        a.publish({"id": "same", "media": "telephone", "resource": "24680"})
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.02)
        b.publish({"id": "same", "media": "telephone", "resource": "24680"})
        await asyncio.to_thread(a.stop)
        for _ in range(500):
            if listener.status is S.Status_Up and b.status()["pending"] == 0:
                break
            await asyncio.sleep(0.02)
        await listener.shutdown()
        return seen

    try:
        assert asyncio.run(run()) == ["same"]
        assert b.status()["counters"]["acked"] == 1
    finally:
        a.close()
        b.close()
