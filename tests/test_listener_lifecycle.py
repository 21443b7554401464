"""The lifecycle table of SPEC §2, row by row, with the blocking vendor classes and a real hub."""

from __future__ import annotations

import socket
import threading

import pytest

from conftest import HubThread, wait_for
from spop_cli import (
    Error,
    ListenerStatus,
    ScreenPopCallbackListener,
    ScreenPopEmailListener,
    ScreenPopError,
    ScreenPopTelephoneListener,
    ScreenPopWebCollaborationListener,
)

S = ListenerStatus
CLASSES = [
    ScreenPopTelephoneListener,
    ScreenPopCallbackListener,
    ScreenPopEmailListener,
    ScreenPopWebCollaborationListener,
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listener_in(state: S, hub: HubThread, cls: type = ScreenPopTelephoneListener):  # type: ignore[no-untyped-def]
    """A listener brought to `state` through the public API."""
    listener = cls(reconnecting_interval=0.2)
    if state is S.Status_Down:
        return listener
    listener.initialize(hub.address)
    if state is S.Status_Idle:
        return listener
    listener.start_listening("13579")
    if state is S.Status_Up:
        return listener
    assert state is S.Status_Reconnecting
    hub.stop()
    assert wait_for(lambda: listener.status is S.Status_Reconnecting)
    return listener


def cleanup(listener, hub: HubThread) -> None:  # type: ignore[no-untyped-def]
    if hub.hub is None:
        hub.start()
    if listener.status is not S.Status_Down:
        listener.shutdown()


# (call, from state, expected new state or error code)
ROWS = [
    ("initialize", S.Status_Down, S.Status_Idle),
    ("initialize", S.Status_Idle, Error.SCREENPOP_Wrong_Status),
    ("initialize", S.Status_Up, Error.SCREENPOP_Wrong_Status),
    ("initialize", S.Status_Reconnecting, Error.SCREENPOP_Wrong_Status),
    ("start_listening", S.Status_Idle, S.Status_Up),
    ("start_listening", S.Status_Up, Error.SCREENPOP_Already_Registered),
    ("start_listening", S.Status_Down, Error.SCREENPOP_Wrong_Status),
    ("start_listening", S.Status_Reconnecting, Error.SCREENPOP_Wrong_Status),
    ("stop_listening", S.Status_Up, S.Status_Idle),
    ("stop_listening", S.Status_Reconnecting, S.Status_Idle),
    ("stop_listening", S.Status_Idle, Error.SCREENPOP_Wrong_Status),
    ("stop_listening", S.Status_Down, Error.SCREENPOP_Wrong_Status),
    ("shutdown", S.Status_Idle, S.Status_Down),
    ("shutdown", S.Status_Up, S.Status_Down),
    ("shutdown", S.Status_Reconnecting, S.Status_Down),
    ("shutdown", S.Status_Down, Error.SCREENPOP_Wrong_Status),
]


@pytest.mark.parametrize("call, start, outcome", ROWS, ids=[f"{c}-{s.value}" for c, s, _ in ROWS])
def test_lifecycle_row(hub: HubThread, call: str, start: S, outcome: S | Error) -> None:
    listener = listener_in(start, hub)
    args = {"initialize": (hub.address,), "start_listening": ("13579",)}.get(call, ())
    try:
        if isinstance(outcome, Error):
            with pytest.raises(ScreenPopError) as info:
                getattr(listener, call)(*args)
            assert info.value.code is outcome
            assert listener.status is start  # a refused call changes nothing
        else:
            getattr(listener, call)(*args)
            assert listener.status is outcome
    finally:
        cleanup(listener, hub)


def test_initialize_without_a_hub_stays_down() -> None:
    listener = ScreenPopTelephoneListener()
    with pytest.raises(ScreenPopError) as info:
        listener.initialize(f"{free_port()}@127.0.0.1")
    assert info.value.code is Error.SCREENPOP_Cannot_Find_HiPath_ProCenter
    assert listener.status is S.Status_Down
    assert listener.administration_server_address == ""


def test_initialize_cannot_create_diags(hub: HubThread, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the diagnostics folder should go")
    monkeypatch.setenv("SPOP_DIAG_DIR", str(blocker / "diag"))
    listener = ScreenPopTelephoneListener()
    with pytest.raises(ScreenPopError) as info:
        listener.initialize(hub.address)
    assert info.value.code is Error.SCREENPOP_Cannot_Create_Diags
    assert listener.status is S.Status_Down


@pytest.mark.parametrize("resource", ["", "   ", "x" * 500, "bad\nline"])
def test_start_listening_refused_stays_idle(hub: HubThread, resource: str) -> None:
    listener = listener_in(S.Status_Idle, hub)
    try:
        with pytest.raises(ScreenPopError) as info:
            listener.start_listening(resource)
        assert info.value.code is Error.SCREENPOP_Cannot_Register
        assert listener.status is S.Status_Idle
    finally:
        listener.shutdown()


def test_shutdown_then_initialize_again(hub: HubThread) -> None:
    listener = listener_in(S.Status_Up, hub)
    listener.shutdown()
    listener.initialize(hub.address)
    listener.start_listening("24680")
    assert listener.status is S.Status_Up and listener.extension == "24680"
    listener.shutdown()


def test_every_status_change_is_reported(hub: HubThread) -> None:
    listener = ScreenPopTelephoneListener(reconnecting_interval=0.2)
    changes: list[tuple[S, S]] = []
    listener.on_status_changed(lambda old, new: changes.append((old, new)))
    listener.initialize(hub.address)
    listener.start_listening("13579")
    hub.stop()
    assert wait_for(lambda: listener.status is S.Status_Reconnecting)
    hub.start()
    assert wait_for(lambda: listener.status is S.Status_Up)
    listener.stop_listening()
    listener.shutdown()
    assert wait_for(lambda: len(changes) == 6)
    assert changes == [
        (S.Status_Down, S.Status_Idle),
        (S.Status_Idle, S.Status_Up),
        (S.Status_Up, S.Status_Reconnecting),
        (S.Status_Reconnecting, S.Status_Up),
        (S.Status_Up, S.Status_Idle),
        (S.Status_Idle, S.Status_Down),
    ]


def test_idle_listener_reconnects_to_idle(hub: HubThread) -> None:
    listener = listener_in(S.Status_Idle, hub)
    hub.stop()
    assert wait_for(lambda: listener.status is S.Status_Reconnecting)
    hub.start()
    assert wait_for(lambda: listener.status is S.Status_Idle)
    listener.start_listening("13579")
    assert listener.status is S.Status_Up
    listener.shutdown()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_properties(hub: HubThread, cls: type) -> None:
    listener = cls()
    assert listener.status is S.Status_Down
    assert listener.reconnecting_interval == 30
    listener.reconnecting_interval = 5
    assert listener.reconnecting_interval == 5
    listener.initialize(hub.address)
    assert listener.administration_server_address == hub.address
    listener.start_listening("agent7")
    name = "extension" if cls is ScreenPopTelephoneListener else "user_id"
    assert getattr(listener, name) == "agent7"
    listener.shutdown()


def test_hub_restart_brings_listener_back_with_pops_flowing(hub: HubThread) -> None:
    listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
    pops = []
    done = threading.Event()

    @listener.on_screen_pop
    def on_pop(event) -> None:  # type: ignore[no-untyped-def]
        pops.append(event)
        done.set()

    listener.initialize(hub.address)
    listener.start_listening("13579")
    hub.stop()
    assert wait_for(lambda: listener.status is S.Status_Reconnecting)
    hub.start()  # same port
    assert wait_for(lambda: listener.status is S.Status_Up)
    hub.publish({"media": "telephone", "resource": "13579", "source": "12345"})
    assert done.wait(5)
    assert pops[0].source == "12345"
    listener.shutdown()


@pytest.mark.parametrize("form", ["{port}@127.0.0.1", "127.0.0.1:{port}", "{port}@localhost"])
def test_address_forms_connect(hub: HubThread, form: str) -> None:
    listener = ScreenPopTelephoneListener()
    listener.initialize(form.format(port=hub.options["port"]))
    assert listener.status is S.Status_Idle
    listener.shutdown()


def test_ipv6_address_form() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        running = HubThread(host="::1")
    except OSError:
        pytest.skip("::1 not available here")
    try:
        listener = ScreenPopTelephoneListener()
        listener.initialize(f"[::1]:{running.options['port']}")
        listener.start_listening("13579")
        assert listener.status is S.Status_Up
        listener.shutdown()
    finally:
        running.close()
