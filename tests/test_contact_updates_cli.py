"""Contact updates seen from outside: `spop listen --json` (a real process, uvloop as the CLI
runs), the live view's card as the contact moves, and a vendor class's on_contact_changed."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from rich.console import Console

from conftest import HubThread, wait_for
from spop_cli import ContactChange, ScreenPopTelephoneListener
from spop_cli.session import PopRow, _move, first_state
from spop_cli.view import pop_card, state_text
from test_listen_cli import finish, listen, wait_registered


def post(hub: HubThread, events: list[dict]) -> None:
    assert hub.hub is not None
    hub.call(hub.hub.apply_contacts(events))


def acked(hub: HubThread) -> bool:
    assert hub.hub is not None
    return not hub.hub.delivery.pending


def test_listen_json_writes_a_line_per_change_after_its_pop(hub: HubThread, tmp_path: Path) -> None:
    process = listen(
        "telephone",
        "13579",
        "--server",
        hub.address,
        "--json",
        "--timeout",
        "20",
        tmp_path=tmp_path,
    )
    try:
        wait_registered(hub, process, "13579")
        post(
            hub,
            [
                {
                    "contact_id": "j",
                    "event": "routed",
                    "resource": "13579",
                    "source": "0612",
                    "at": "2024-05-14T09:00:00Z",
                }
            ],
        )
        assert wait_for(lambda: acked(hub), 20)
        post(
            hub,
            [
                {
                    "contact_id": "j",
                    "event": "answered",
                    "resource": "13579",
                    "at": "2024-05-14T09:00:04Z",
                }
            ],
        )
        post(hub, [{"contact_id": "j", "event": "ended", "at": "2024-05-14T09:01:04Z"}])
        assert wait_for(lambda: acked(hub), 20)
    finally:
        process.terminate()
    code, out, err = finish(process)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(line.get("type", "pop"), line.get("change", "")) for line in lines] == [
        ("pop", ""),
        ("change", "answered"),
        ("change", "ended"),
    ]
    assert lines[2]["talk_time"] == 60 and lines[2]["pop_id"] == lines[0]["id"]
    assert list(lines[1])[0] == "type" and lines[1]["received_at"].endswith("Z")


def _change(kind: str, **fields: object) -> ContactChange:
    body = {
        "id": "x",
        "contact_id": "c",
        "media": "telephone",
        "resource": "13579",
        "pop_id": "p1",
        "change": kind,
        "at": "t",
    }
    return ContactChange.from_dict({**body, **fields})


def _text(renderable: object) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_live_card_moves_ringing_talking_with_a_clock_ended() -> None:
    row = PopRow(1_700_000_000.0, "telephone", "13579", "p1", "0612", "Ventes", "", 10)
    row.state = first_state("telephone", "c")
    assert state_text(row).plain == "ringing"
    assert "ringing" in _text(pop_card(row))
    _move(row, _change("answered", answered_by="13579"))
    assert row.state == "talking" and row.talk_since is not None
    assert state_text(row, now=row.talk_since + 65).plain == "talking 1:05"
    assert "talking" in _text(pop_card(row))
    _move(row, _change("ended", talk_time=130))
    assert state_text(row).plain == "ended · talked 2:10"
    assert "ended · talked 2:10" in _text(pop_card(row))


def test_live_card_answered_elsewhere_and_transferred() -> None:
    row = PopRow(1_700_000_000.0, "telephone", "13579", "p1", "0612", "Ventes", "", 10)
    _move(row, _change("answered", answered_by="24680", reason="answered elsewhere"))
    assert state_text(row).plain == "answered elsewhere · by 24680"
    other = PopRow(1_700_000_000.0, "telephone", "13579", "p2", "0612", "Ventes", "", 10)
    _move(other, _change("transferred", transferred_to="54321"))
    assert state_text(other).plain == "transferred · to 54321"


def test_vendor_class_on_contact_changed_runs_on_its_thread_in_order(hub: HubThread) -> None:
    seen: list[tuple[str, str]] = []
    threads: set[str] = set()
    listener = ScreenPopTelephoneListener(reconnecting_interval=1)

    @listener.on_screen_pop
    def popped(event) -> None:  # type: ignore[no-untyped-def]
        seen.append(("pop", event.extension))
        threads.add(threading.current_thread().name)

    @listener.on_contact_changed
    def changed(change) -> None:  # type: ignore[no-untyped-def]
        seen.append((change.change, change.answered_by))
        threads.add(threading.current_thread().name)

    assert changed.__name__ == "changed"  # the decorator returns the function
    listener.initialize(hub.address)
    listener.start_listening("13579")
    try:
        post(hub, [{"contact_id": "v", "event": "routed", "resource": "13579"}])
        assert wait_for(lambda: acked(hub), 20)
        post(
            hub,
            [
                {"contact_id": "v", "event": "answered", "resource": "13579"},
                {"contact_id": "v", "event": "ended"},
            ],
        )
        assert wait_for(lambda: len(seen) == 3 and acked(hub), 20)
        assert seen == [("pop", "13579"), ("answered", "13579"), ("ended", "")]
        assert threads == {"spop-telephone-callbacks"}
    finally:
        listener.shutdown()


def test_a_change_action_result_names_the_change_and_its_pop() -> None:
    from guide_pops import guide_pop
    from spop_cli.dispatch import ChangeTrigger, Outcome
    from spop_cli.view import result_line

    pop = guide_pop()
    trigger = ChangeTrigger(_change("ended", talk_time=9, pop_id=pop.id), pop)
    assert trigger.source == pop.source and trigger.talk_time == 9 and trigger.id == "x"
    assert trigger.to_dict()["queue_name"] == pop.queue_name
    line = result_line(None, "wrapup", trigger, Outcome("ok", 0.5))
    assert line.endswith(f"telephone 13579: action wrapup ok for ended of pop {pop.id} in 0.500 s")


@pytest.mark.parametrize(
    ("media", "contact_id", "state"),
    [("telephone", "c", "ringing"), ("email", "c", "offered"), ("callback", "c", "offered"),
     ("webcollab", "c", "offered"), ("telephone", "", "")],
)  # fmt: skip
def test_a_tracked_contacts_card_starts_ringing_or_offered(
    media: str, contact_id: str, state: str
) -> None:
    assert first_state(media, contact_id) == state
