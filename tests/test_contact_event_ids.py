"""Contact event ids: a retried or resent event is applied once within the duplicate window, its
pop's id derives from the event's, refusals still name their place in the body, and a repeat after
a hub restart makes no second pop (the journal remembers the pop id)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import HubThread, wait_for
from spop_cli import ScreenPopTelephoneListener
from spop_cli.hub.contacts import ContactEventError, ContactTracker, pop_id_for

T0 = datetime(2024, 5, 14, 9, 0, 0, tzinfo=UTC)
WINDOW = 120.0


def ev(
    kind: str, event_id: str | None, contact_id: str = "call-1", **fields: Any
) -> dict[str, Any]:
    event = {"contact_id": contact_id, "event": kind, **fields}
    if event_id is not None:
        event["id"] = event_id
    return event


def apply(tracker: ContactTracker, events: Any, seconds: float = 0.0) -> list[Any]:
    return tracker.apply_batch(events, T0 + timedelta(seconds=seconds))


def test_a_duplicate_just_inside_the_window_changes_nothing_and_pops_nobody() -> None:
    tracker = ContactTracker(dedupe_window=WINDOW)
    apply(
        tracker, [ev("queued", "q-1", queue_name="Ventes"), ev("routed", "r-1", resource="13579")]
    )

    again = apply(
        tracker,
        [ev("queued", "q-1", queue_name="Autre"), ev("routed", "r-1", resource="13579")],
        WINDOW - 0.001,
    )

    assert [(o.duplicate, o.pops) for o in again] == [(True, []), (True, [])]
    assert tracker.event_ids.duplicates == 2
    # the queue name was not changed by the duplicate: a new routing pops the original one
    [outcome] = apply(tracker, ev("routed", "r-2", resource="54321"), WINDOW)
    assert outcome.pops[0].queue_name == "Ventes"


def test_a_repeat_at_the_end_of_the_window_applies_again() -> None:
    tracker = ContactTracker(dedupe_window=WINDOW)
    apply(tracker, [ev("queued", "q-1"), ev("routed", "r-1", resource="13579")])

    [outcome] = apply(tracker, ev("routed", "r-1", resource="13579"), WINDOW)

    assert outcome.duplicate is False
    assert [pop.resource for pop in outcome.pops] == ["13579"]
    assert tracker.event_ids.duplicates == 0


def test_the_error_index_is_the_position_in_the_body_duplicates_included() -> None:
    tracker = ContactTracker(dedupe_window=WINDOW)
    apply(tracker, ev("queued", "q-1"))
    events = [
        ev("queued", "q-1"),  # a duplicate: applied, nothing changes
        ev("routed", "r-1", resource="13579"),
        ev("hung_up", "h-1"),
        ev("ended", "e-1"),
    ]

    with pytest.raises(ContactEventError) as caught:
        apply(tracker, events, 1)

    error = caught.value
    assert (error.error, error.field, error.index) == ("unknown_event", "event", 2)
    assert [(o.duplicate, len(o.pops)) for o in error.applied] == [(True, 0), (False, 1)]


def test_a_refused_event_is_not_remembered_and_may_be_sent_again() -> None:
    tracker = ContactTracker(dedupe_window=WINDOW)
    with pytest.raises(ContactEventError) as caught:
        apply(tracker, ev("answered", "a-1", resource="13579"))
    assert caught.value.error == "unknown_contact"
    apply(tracker, ev("queued", "q-1"), 1)

    [outcome] = apply(tracker, ev("answered", "a-1", resource="13579"), 2)

    assert outcome.duplicate is False


def test_a_repeated_ended_is_applied_not_refused() -> None:
    tracker = ContactTracker(dedupe_window=WINDOW)
    apply(tracker, [ev("queued", "q-1"), ev("ended", "e-1")])

    [outcome] = apply(tracker, ev("ended", "e-1"), 5)

    assert (outcome.duplicate, outcome.ended) == (True, False)
    with pytest.raises(ContactEventError) as caught:  # a new end, though, is late
        apply(tracker, ev("ended", "e-2"), 6)
    assert caught.value.error == "contact_ended"


def test_the_pop_id_derives_from_the_event_id() -> None:
    tracker = ContactTracker(dedupe_window=WINDOW)
    longest_kept, digested = "x" * 128, "y" * 129
    outcomes = apply(
        tracker,
        [
            ev("routed", "EV01", resource="13579"),
            ev("transferred", longest_kept, resource="54321"),
            ev("transferred", digested, resource="24680"),
            ev("transferred", None, resource="13579"),
        ],
    )

    ids = [outcome.pops[0].id for outcome in outcomes]
    assert ids[:3] == ["EV01", longest_kept, pop_id_for(digested)]
    assert (
        pop_id_for(digested)
        == "sha256:" + __import__("hashlib").sha256(digested.encode()).hexdigest()[:32]
    )
    assert len(ids[3]) == 32 and ids[3] not in ids[:3]  # no id: a random one, as before


@pytest.mark.parametrize(
    ("value", "error"),
    [("", "missing_field"), ("z" * 257, "too_long"), (7, "wrong_type"), (["a"], "wrong_type")],
)
def test_a_bad_id_is_refused_naming_the_field(value: Any, error: str) -> None:
    with pytest.raises(ContactEventError) as caught:
        apply(ContactTracker(), {"contact_id": "c", "event": "queued", "id": value})
    assert (caught.value.error, caught.value.field) == (error, "id")


def test_an_id_of_256_characters_is_taken() -> None:
    [outcome] = apply(ContactTracker(), ev("queued", "z" * 256))
    assert outcome.event_id == "z" * 256


def test_ids_older_than_the_window_are_forgotten() -> None:
    tracker = ContactTracker(dedupe_window=WINDOW)
    apply(tracker, [ev("queued", f"q-{n}", contact_id=f"c-{n}") for n in range(5)])
    assert len(tracker.event_ids) == 5
    tracker.expire(T0 + timedelta(seconds=WINDOW))
    assert len(tracker.event_ids) == 0


# --- through a real hub --------------------------------------------------------------------


def post(hub: HubThread, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        hub.http + "/v1/contacts",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Pops:
    def __init__(self, hub: HubThread, resource: str) -> None:
        self.got: list[Any] = []
        self.listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
        self.listener.on_screen_pop(self.got.append)
        self.listener.initialize(hub.address)
        self.listener.start_listening(resource)

    def close(self) -> None:
        self.listener.shutdown()


def test_a_retried_post_gives_one_pop_and_counts_the_duplicates() -> None:
    hub = HubThread()
    pops = Pops(hub, "13579")
    try:
        body = [
            {"id": "EVq1", "contact_id": "tw-1", "event": "queued", "source": "+3212345"},
            {"id": "EVr1", "contact_id": "tw-1", "event": "routed", "resource": "13579"},
        ]
        first = post(hub, body)
        second = post(hub, body)

        assert first == (200, {"applied": 2, "pops": ["EVr1"]})
        assert second == (200, {"applied": 2, "pops": []})
        assert wait_for(lambda: len(pops.got) == 1)
        # a marker after the repeat proves no second pop was on its way
        [marker] = hub.publish({"media": "telephone", "resource": "13579", "source": "marker"})
        assert wait_for(lambda: len(pops.got) == 2)
        assert [pop.id for pop in pops.got] == ["EVr1", marker]
        assert hub.status()["counters"]["duplicate_events"] == 2
        assert hub.status()["counters"]["contact_events"] == 4
    finally:
        pops.close()
        hub.close()


def test_a_repeat_after_a_restart_makes_no_second_pop(tmp_path: Path) -> None:
    hub = HubThread(journal=str(tmp_path / "journal.sqlite3"))
    pops = Pops(hub, "13579")
    try:
        event = {"id": "EVr9", "contact_id": "tw-9", "event": "routed", "resource": "13579"}
        assert post(hub, event) == (200, {"applied": 1, "pops": ["EVr9"]})
        assert wait_for(lambda: len(pops.got) == 1)
        assert wait_for(lambda: hub.status()["pending"] == 0)  # acked: the journal keeps its id
        hub.stop()
        hub.start()  # the event ids come back with their contact's journalled state

        # a duplicate, answered as one without a restart (it was applied again, and its pop
        # refused by the journal's pop-id window: the same outcome, by a longer way)
        assert post(hub, event) == (200, {"applied": 1, "pops": []})

        [marker] = hub.publish({"media": "telephone", "resource": "13579", "source": "marker"})
        assert wait_for(lambda: len(pops.got) == 2)
        assert [pop.id for pop in pops.got] == ["EVr9", marker]
        assert hub.status()["counters"]["duplicate_events"] == 1
    finally:
        pops.close()
        hub.close()
