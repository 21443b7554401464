"""Pops through a real hub: every media end to end, routing by (media, resource), fan-out."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from conftest import HubThread, wait_for
from spop_cli import (
    ListenerStatus,
    ScreenPopCallbackListener,
    ScreenPopEmailListener,
    ScreenPopTelephoneListener,
    ScreenPopWebCollaborationListener,
)
from spop_cli.model import (
    ScreenPopCallbackEvent,
    ScreenPopEmailEvent,
    ScreenPopTelephoneEvent,
    ScreenPopWebCollaborationEvent,
)

MEDIA = [
    ("telephone", ScreenPopTelephoneListener, ScreenPopTelephoneEvent, "13579"),
    ("callback", ScreenPopCallbackListener, ScreenPopCallbackEvent, "jdurand"),
    ("email", ScreenPopEmailListener, ScreenPopEmailEvent, "mmartin"),
    ("webcollab", ScreenPopWebCollaborationListener, ScreenPopWebCollaborationEvent, "pmoreau"),
]


class Collector:
    def __init__(self) -> None:
        self.pops: list = []
        self.event = threading.Event()

    def __call__(self, pop) -> None:  # type: ignore[no-untyped-def]
        self.pops.append(pop)
        self.event.set()


def up(cls: type, hub: HubThread, resource: str):  # type: ignore[no-untyped-def]
    listener = cls(reconnecting_interval=0.3)
    collector = Collector()
    listener.on_screen_pop(collector)
    listener.initialize(hub.address)
    listener.start_listening(resource)
    return listener, collector


@pytest.mark.parametrize("media, cls, event_cls, resource", MEDIA, ids=[m[0] for m in MEDIA])
def test_each_media_end_to_end(
    hub: HubThread, media: str, cls: type, event_cls: type, resource: str
) -> None:
    listener, got = up(cls, hub, resource)
    pop = {
        "media": media,
        "resource": resource,
        "source": "12345",
        "destination": "2468",
        "queue_name": "File d'attente des ventes",
        "contact_description": "Ventes",
        "wait_time": 10,
        "contact_data": {"code1": "chaîne1", "code2": "a=b"},
    }
    [pop_id] = hub.publish(pop)
    assert got.event.wait(5)
    event = got.pops[0]
    assert type(event) is event_cls
    assert event.id == pop_id and event.resource == resource
    assert event.queue_name == "File d'attente des ventes" and event.wait_time == 10
    assert [(i.key, i.value) for i in event.contact_data] == [
        ("code1", "chaîne1"),
        ("code2", "a=b"),
    ]
    assert event.created_at.endswith("Z")
    listener.shutdown()


def test_pop_reaches_only_its_resource_and_media(hub: HubThread) -> None:
    target, got = up(ScreenPopTelephoneListener, hub, "13579")
    other_ext, other = up(ScreenPopTelephoneListener, hub, "54321")
    other_media, wrong = up(ScreenPopEmailListener, hub, "13579")
    hub.publish({"media": "telephone", "resource": "13579", "source": "1"})
    hub.publish({"media": "telephone", "resource": "54321", "source": "2"})
    assert wait_for(lambda: len(got.pops) == 1 and len(other.pops) == 1)
    # a marker pop to the email listener proves nothing else was queued before it
    hub.publish({"media": "email", "resource": "13579", "source": "marker"})
    assert wait_for(lambda: len(wrong.pops) == 1)
    assert [p.source for p in got.pops] == ["1"]
    assert [p.source for p in other.pops] == ["2"]
    assert [p.source for p in wrong.pops] == ["marker"]
    for listener in (target, other_ext, other_media):
        listener.shutdown()


def test_two_listeners_on_one_resource_both_get_it(hub: HubThread) -> None:
    first, got1 = up(ScreenPopTelephoneListener, hub, "13579")
    second, got2 = up(ScreenPopTelephoneListener, hub, "13579")
    hub.publish({"media": "telephone", "resource": "13579", "source": "12345"})
    assert got1.event.wait(5) and got2.event.wait(5)
    assert got1.pops[0].id == got2.pops[0].id
    first.shutdown()
    second.shutdown()


def test_stopped_listener_gets_nothing(hub: HubThread) -> None:
    listener, got = up(ScreenPopTelephoneListener, hub, "13579")
    listener.stop_listening()
    hub.publish({"media": "telephone", "resource": "13579"})
    listener.start_listening("54321")
    hub.publish({"media": "telephone", "resource": "54321", "source": "after"})
    assert wait_for(lambda: len(got.pops) == 1)
    assert got.pops[0].source == "after"
    listener.shutdown()


def test_pop_waiting_for_a_listener_is_delivered_when_it_registers(hub: HubThread) -> None:
    hub.publish({"media": "callback", "resource": "jdurand", "destination": "0601020304"})
    listener, got = up(ScreenPopCallbackListener, hub, "jdurand")
    assert got.event.wait(5)
    assert got.pops[0].destination == "0601020304"
    listener.shutdown()


def http_json(url: str, body: object | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_post_one_pop_and_an_array(hub: HubThread) -> None:
    listener, got = up(ScreenPopWebCollaborationListener, hub, "pmoreau")
    status, body = http_json(
        f"{hub.http}/v1/pops", {"media": "webcollab", "resource": "pmoreau", "source": "192.0.2.1"}
    )
    assert status == 200 and body["accepted"] == 1
    status, body = http_json(
        f"{hub.http}/v1/pops",
        [{"media": "webcollab", "resource": "pmoreau", "source": str(i)} for i in range(3)],
    )
    assert status == 200 and body["accepted"] == 3 and len(body["ids"]) == 3
    assert wait_for(lambda: len(got.pops) == 4)
    assert [p.source for p in got.pops] == ["192.0.2.1", "0", "1", "2"]
    listener.shutdown()


def test_http_health_and_status(hub: HubThread) -> None:
    listener, _ = up(ScreenPopEmailListener, hub, "mmartin")
    status, body = http_json(f"{hub.http}/v1/health")
    assert status == 200 and body["status"] == "ok"
    hub.publish({"media": "email", "resource": "mmartin"})
    assert wait_for(lambda: http_json(f"{hub.http}/v1/status")[1]["counters"].get("acked") == 1)
    status, body = http_json(f"{hub.http}/v1/status")
    assert {"media": "email", "resource": "mmartin", "connections": 1} in body["listeners"]
    assert body["counters"]["pops_accepted"] == 1 and body["pending"] == 0
    listener.shutdown()


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"media": "fax", "resource": "1"}, 422, "media"),
        ({"media": "telephone"}, 422, "resource"),
        ({"media": "telephone", "resource": ""}, 422, "resource"),
        ({"media": "telephone", "resource": "1", "wait_time": -3}, 422, "wait_time"),
        ({"media": "telephone", "resource": "1", "queue": "x"}, 422, "queue"),
        ({"media": "telephone", "resource": "1", "contact_data": ["a"]}, 422, "contact_data"),
        ("just a string", 400, None),
    ],
)
def test_http_bad_pops_are_refused_with_the_field(
    hub: HubThread, body: object, status: int, field: str | None
) -> None:
    got_status, answer = http_json(f"{hub.http}/v1/pops", body)
    assert got_status == status
    assert answer["message"] and answer["error"]
    assert answer.get("field") == field


def test_http_bad_pop_in_an_array_names_its_index_and_accepts_none(hub: HubThread) -> None:
    status, answer = http_json(
        f"{hub.http}/v1/pops",
        [
            {"media": "telephone", "resource": "1"},
            {"media": "telephone", "resource": "2"},
            {"media": "x", "resource": "3"},
        ],
    )
    assert status == 422 and answer["index"] == 2
    assert hub.status()["counters"].get("pops_accepted", 0) == 0


def test_ack_goes_out_before_stop_listening(hub: HubThread) -> None:
    """Acks are batched per loop iteration; stopping right after a pop must not strand them
    (the hub takes acks only from a registered key, and would redeliver the pop)."""
    import asyncio

    from spop_cli import AsyncListener

    async def scenario() -> None:
        listener = AsyncListener("telephone")
        arrived = asyncio.Event()
        listener.on_screen_pop(lambda event: arrived.set())
        await listener.initialize(hub.address)
        await listener.start_listening("13579")
        sending = asyncio.ensure_future(
            asyncio.to_thread(hub.publish, {"media": "telephone", "resource": "13579"})
        )
        await arrived.wait()  # woken by the callback itself, before the ack is flushed
        await listener.stop_listening()  # in the same iteration the pop's ack was queued in
        await listener.shutdown()
        await sending

    asyncio.run(scenario())
    assert wait_for(lambda: hub.status()["counters"].get("acked") == 1, timeout=2)
    assert hub.status()["pending"] == 0


def test_blocking_listener_acks_only_after_its_callback_returned(hub: HubThread) -> None:
    """A desktop that dies inside its callback must get the pop again: no ack before it returns."""
    listener = ScreenPopTelephoneListener()
    entered, release = threading.Event(), threading.Event()

    @listener.on_screen_pop
    def slow(event) -> None:  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(10)

    listener.initialize(hub.address)
    listener.start_listening("13579")
    hub.publish({"media": "telephone", "resource": "13579"})
    assert entered.wait(5)
    time.sleep(0.2)  # room for a premature ack to arrive
    assert hub.status()["pending"] == 1
    release.set()
    assert wait_for(lambda: hub.status()["pending"] == 0)
    assert hub.status()["counters"]["acked"] == 1
    listener.shutdown()


def test_shutdown_during_a_reconnect_attempt_closes_its_connection(hub: HubThread) -> None:
    """A hub that accepts but never answers: shutting down mid-handshake leaves no socket open."""
    import socket as sockets

    listener = ScreenPopTelephoneListener(reconnecting_interval=0.2, timeout=30)
    listener.initialize(hub.address)
    listener.start_listening("13579")
    port = hub.options["port"]
    hub.stop()
    mute = sockets.socket()
    mute.setsockopt(sockets.SOL_SOCKET, sockets.SO_REUSEADDR, 1)
    mute.bind(("127.0.0.1", port))
    mute.listen()
    mute.settimeout(10)
    try:
        peer, _ = mute.accept()  # the listener's reconnect attempt, waiting for `welcome`
        peer.settimeout(5)
        assert b"hello" in peer.recv(4096)
        listener.shutdown()
        assert listener.status is ListenerStatus.Status_Down
        assert peer.recv(4096) == b""  # closed by the listener, not left open
        peer.close()
    finally:
        mute.close()
        hub.start()
