"""Contact lifecycle rules (spop_cli.hub.contacts): the guide's tables, each rule, each refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from spop_cli.hub.contacts import MAX_BATCH, ContactEventError, ContactTracker, Outcome
from spop_cli.model import EVENT_CLASSES, MEDIA_FIELDS, TEXT_FIELDS, Media
from spop_cli.pops import normalize_pop

T0 = datetime(2024, 5, 14, 9, 0, 0, tzinfo=UTC)
SALES = {
    "source": "12345",
    "destination": "2468",
    "queue_name": "File d'attente des ventes",
    "contact_description": "Ventes",
    "contact_data": {"code1": "chaîne1"},
}


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def ev(kind: str, seconds: float, contact_id: str = "call-1", **fields: Any) -> dict[str, Any]:
    if "from_" in fields:
        fields["from"] = fields.pop("from_")
    return {"contact_id": contact_id, "event": kind, "at": at(seconds), **fields}


def pops_of(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """Every pop's wire form without its random id, contact_data as ordered pairs."""
    pops = []
    for outcome in outcomes:
        for pop in outcome.pops:
            wire = pop.to_dict()
            del wire["id"]
            wire["contact_data"] = list(wire["contact_data"].items())
            pops.append(wire)
    return pops


def play(events: list[dict[str, Any]], tracker: ContactTracker | None = None) -> list[dict]:
    return pops_of((ContactTracker() if tracker is None else tracker).apply_batch(events, T0))


def refusal(events: list[dict[str, Any]] | Any, tracker: ContactTracker | None = None):
    with pytest.raises(ContactEventError) as caught:
        (ContactTracker() if tracker is None else tracker).apply_batch(events, T0)
    return caught.value


ROUTED_CALL = [
    ev("queued", 0, media="telephone", **SALES),
    ev("routed", 10, resource="13579"),
    ev("answered", 15, resource="13579"),
]
CONSULTATION = [*ROUTED_CALL, ev("consulted", 40, resource="54321")]
REQUEUE = [
    *ROUTED_CALL,
    ev(
        "requeued",
        60,
        queue_name="File d'attente Service",
        contact_description="Service",
        contact_data={"code2": "chaîne2"},
    ),
    ev("routed", 65, resource="1111"),
]


# SPEC §2 "The guide's three scenarios": the last pop of each, every field.
@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param(
            ROUTED_CALL,
            {
                "resource": "13579",
                "source": "12345",
                "destination": "2468",
                "queue_name": "File d'attente des ventes",
                "contact_description": "Ventes",
                "contact_data": [("code1", "chaîne1")],
                "wait_time": 10,
                "from": "",
                "redirect": "",
                "created_at": "2024-05-14T09:00:10.000Z",
            },
            id="2.2.1-routed-call",
        ),
        pytest.param(
            CONSULTATION,
            {
                "resource": "54321",
                "source": "12345",
                "destination": "2468",
                "queue_name": "File d'attente des ventes",
                "contact_description": "Ventes",
                "contact_data": [("code1", "chaîne1")],
                "wait_time": 15,
                "from": "13579",
                "redirect": "",
                "created_at": "2024-05-14T09:00:40.000Z",
            },
            id="2.2.2-consultation",
        ),
        pytest.param(
            REQUEUE,
            {
                "resource": "1111",
                "source": "12345",
                "destination": "2468",
                "queue_name": "File d'attente Service",
                "contact_description": "Service",
                "contact_data": [("code2", "chaîne2")],
                "wait_time": 5,
                "from": "",
                "redirect": "",
                "created_at": "2024-05-14T09:01:05.000Z",
            },
            id="2.2.3-requeue",
        ),
    ],
)
def test_guide_tables(events, expected):
    pop = play(events)[-1]
    assert pop == {"media": "telephone", "contact_id": "call-1", **expected}


# Queued at 0 with every contact field, routed to 13579 at 10, maybe answered at 15, then the
# event at 40. Wait: from segment start to the first answer, or to the event when unanswered.
POP_RULES = [
    # event, answered first, extra fields, wait_time, from, redirect
    ("routed", False, {}, 40, "", ""),
    ("routed", True, {}, 15, "", ""),
    ("consulted", True, {}, 15, "13579", ""),
    ("consulted", True, {"from_": "24680"}, 15, "24680", ""),
    ("transferred", True, {}, 15, "13579", ""),
    ("transferred", False, {}, 40, "13579", ""),
    ("conferenced", True, {}, 15, "13579", ""),
    ("redirected", False, {}, 40, "", "13579"),
    ("redirected", False, {"redirect": "99999"}, 40, "", "99999"),
    ("redirected", True, {}, 15, "", "13579"),
    ("picked_up", False, {}, 40, "", ""),
    ("picked_up", True, {}, 15, "", ""),
    ("recalled", True, {}, 15, "", ""),
    ("resumed", True, {}, 15, "", ""),
    ("resumed", False, {}, 40, "", ""),
    ("invited", True, {}, 15, "13579", ""),
]


@pytest.mark.parametrize("media", list(Media), ids=str)
@pytest.mark.parametrize(
    ("kind", "answered", "extra", "wait", "from_", "redirect"),
    POP_RULES,
    ids=[f"{row[0]}-{'answered' if row[1] else 'ringing'}-{i}" for i, row in enumerate(POP_RULES)],
)
def test_pop_event_for_each_media(media, kind, answered, extra, wait, from_, redirect):
    events = [
        ev("queued", 0, media=media.value, **SALES),
        ev("routed", 10, resource="13579"),
        *([ev("answered", 15, resource="13579")] if answered else []),
        ev(kind, 40, resource="24680", **extra),
    ]
    outcomes = ContactTracker().apply_batch(events, T0)
    pop = outcomes[-1].pops[0]
    assert type(pop) is EVENT_CLASSES[media]
    full = {**SALES, "from": from_, "redirect": redirect}
    expected = {name: (full[name] if name in MEDIA_FIELDS[media] else "") for name in TEXT_FIELDS}
    wire = pop.to_dict()
    assert {name: wire[name] for name in TEXT_FIELDS} == expected
    assert (wire["media"], wire["resource"], wire["contact_id"]) == (media.value, "24680", "call-1")
    assert wire["wait_time"] == wait
    assert wire["contact_data"] == {"code1": "chaîne1"}


@pytest.mark.parametrize("kind", ["queued", "answered", "requeued", "ended"])
def test_events_without_pops(kind):
    extra = {"resource": "13579"} if kind == "answered" else {}
    outcomes = ContactTracker().apply_batch([*ROUTED_CALL, ev(kind, 20, **extra)], T0)
    assert outcomes[-1].pops == []
    assert outcomes[-1].ended is (kind == "ended")
    assert outcomes[-1].contact_id == "call-1"


def test_direct_call_has_no_wait_and_no_queue():
    pops = play(
        [
            ev("routed", 0, source="0145678900", destination="13579", resource="13579"),
            ev("redirected", 20, resource="24680"),
        ]
    )
    assert [(p["media"], p["wait_time"], p["queue_name"]) for p in pops] == [
        ("telephone", 0, ""),
        ("telephone", 0, ""),
    ]
    assert pops[1]["redirect"] == "13579"


def test_queued_again_while_waiting_keeps_the_wait():
    # An overflow to another queue (or a resent `queued`) does not restart the caller's wait.
    pops = play(
        [
            ev("queued", 0, **SALES),
            ev("queued", 30, queue_name="Débordement"),
            ev("routed", 50, resource="13579"),
        ]
    )
    assert (pops[0]["wait_time"], pops[0]["queue_name"]) == (50, "Débordement")


def test_queued_after_an_answer_starts_a_new_segment():
    pops = play([*ROUTED_CALL, ev("queued", 100, queue_name="Q2"), ev("routed", 108, resource="1")])
    assert (pops[-1]["wait_time"], pops[-1]["contact_data"]) == (8, [("code1", "chaîne1")])


def test_contact_data_merges_in_order_and_requeue_replaces_it():
    events = [
        ev("queued", 0, contact_data={"b": "1", "a": "2"}),
        ev("routed", 5, resource="13579", contact_data={"a": "3", "c": "4"}),
        ev("requeued", 9, contact_data={"z": "9"}),
        ev("routed", 10, resource="1111"),
    ]
    pops = play(events)
    assert pops[0]["contact_data"] == [("b", "1"), ("a", "3"), ("c", "4")]
    assert pops[1]["contact_data"] == [("z", "9")]


def test_requeue_without_queue_fields_empties_them():
    pops = play([*ROUTED_CALL, ev("requeued", 20), ev("routed", 21, resource="1111")])
    last = pops[-1]
    assert (last["queue_name"], last["contact_description"], last["contact_data"]) == ("", "", [])
    assert (last["source"], last["destination"]) == ("12345", "2468")


def test_from_follows_the_contact_through_transfers():
    pops = play(
        [
            *ROUTED_CALL,
            ev("transferred", 30, resource="54321"),
            ev("transferred", 50, resource="24680"),
            ev("consulted", 60, resource="11111"),
            ev("conferenced", 70, resource="22222"),
        ]
    )
    assert [p["from"] for p in pops] == ["", "13579", "54321", "24680", "24680"]


def test_recall_returns_to_the_transferring_agent():
    pops = play(
        [
            *ROUTED_CALL,
            ev("transferred", 30, resource="54321"),
            ev("recalled", 50, resource="13579"),
            ev("transferred", 60, resource="24680"),
        ]
    )
    assert [(p["resource"], p["from"]) for p in pops] == [
        ("13579", ""),
        ("54321", "13579"),
        ("13579", ""),
        ("24680", "13579"),
    ]


def test_media_defaults_to_telephone_and_is_kept():
    pops = play(
        [
            ev("routed", 0, resource="13579"),
            ev("transferred", 1, media="telephone", resource="54321"),
        ]
    )
    assert [p["media"] for p in pops] == ["telephone", "telephone"]


def test_media_is_case_insensitive():
    assert play([ev("routed", 0, media="Email", resource="a")])[0]["media"] == "email"


def test_null_fields_count_as_absent():
    pops = play([ev("routed", 0, resource="13579", media=None, redirect=None, contact_data=None)])
    assert pops[0]["redirect"] == "" and pops[0]["contact_data"] == []


# Time: `at` is optional (received_at), any offset, naive is UTC; waits floor to whole seconds.
@pytest.mark.parametrize(
    ("routed_at", "wait"),
    [
        ("2024-05-14T09:00:10Z", 10),
        ("2024-05-14T09:00:10.999Z", 10),
        ("2024-05-14T11:00:10+02:00", 10),
        ("2024-05-14T09:00:10", 10),
        ("2024-05-14T09:00:09.999999+00:00", 9),
        (None, 0),
    ],
)
def test_time_forms_and_floor(routed_at, wait):
    tracker = ContactTracker()
    tracker.apply({"contact_id": "c", "event": "queued", "at": "2024-05-14T09:00:00Z"}, T0)
    routed = {"contact_id": "c", "event": "routed", "resource": "1", "at": routed_at}
    pop = tracker.apply(routed, T0).pops[0]
    assert pop.wait_time == wait


@pytest.mark.parametrize(
    ("seconds", "expected"), [(10**9, 10**9), (10**9 + 1, 10**9), (10**11, 10**9)]
)
def test_waits_and_talk_times_years_apart_stop_at_a_pops_limit(seconds, expected):
    """A pop's wait_time is at most 10⁹ (pops.py refuses more): absurd `at` values give that."""
    start = datetime(1990, 1, 1, tzinfo=UTC)
    queued = {"contact_id": "c", "event": "queued", "at": start.isoformat()}
    later = (start + timedelta(seconds=seconds)).isoformat()
    tracker = ContactTracker()
    tracker.apply(queued, T0)
    routed = {"contact_id": "c", "event": "routed", "resource": "1", "at": later}
    pop = tracker.apply(routed, T0).pops[0]
    assert pop.wait_time == expected
    normalize_pop(pop.to_dict())  # a pop the hub would take from a source too
    tracker.apply({"contact_id": "c", "event": "answered", "resource": "1", "at": later}, T0)
    end = (start + timedelta(seconds=2 * seconds)).isoformat()
    ended = tracker.apply({"contact_id": "c", "event": "ended", "at": end}, T0)
    assert [c.talk_time for c in ended.changes] == [expected]


def test_received_at_naive_is_utc_and_sets_created_at():
    naive = datetime(2024, 5, 14, 9, 0, 7)
    pop = (
        ContactTracker()
        .apply({"contact_id": "c", "event": "routed", "resource": "1"}, naive)
        .pops[0]
    )
    assert pop.created_at == "2024-05-14T09:00:07.000Z"


def test_equal_times_are_not_backwards():
    assert play([ev("queued", 5), ev("routed", 5, resource="1")])[0]["wait_time"] == 0


ENDED = [*ROUTED_CALL, ev("ended", 20)]
LONG = "x" * 1025


# Every refusal: (events, status, error name, field). The last event is the one refused.
@pytest.mark.parametrize(
    ("events", "status", "error", "field"),
    [
        pytest.param(["not an event"], 400, "not_an_object", None, id="not-an-object"),
        pytest.param([{"event": "queued"}], 422, "missing_field", "contact_id", id="no-contact-id"),
        pytest.param([ev("queued", 0, contact_id=7)], 400, "wrong_type", "contact_id", id="contact-id-int"),
        pytest.param([ev("queued", 0, contact_id=" ")], 422, "missing_field", "contact_id", id="contact-id-blank"),
        pytest.param([ev("queued", 0, contact_id="c" * 257)], 422, "too_long", "contact_id", id="contact-id-long"),
        pytest.param([{"contact_id": "c"}], 422, "missing_field", "event", id="no-event"),
        pytest.param([{"contact_id": "c", "event": ["queued"]}], 400, "wrong_type", "event", id="event-list"),
        pytest.param([ev("parked", 0)], 422, "unknown_event", "event", id="unknown-event"),
        pytest.param([ev("answered", 0, resource="1")], 422, "unknown_contact", "contact_id", id="unknown-contact"),
        pytest.param([ev("requeued", 0)], 422, "unknown_contact", "contact_id", id="requeue-unknown"),
        pytest.param([ev("ended", 0)], 422, "unknown_contact", "contact_id", id="end-unknown"),
        pytest.param([ev("routed", 0)], 422, "missing_field", "resource", id="no-resource"),
        pytest.param([*ROUTED_CALL, ev("consulted", 20)], 422, "missing_field", "resource", id="consult-no-resource"),
        pytest.param([ev("routed", 0, resource=13579)], 400, "wrong_type", "resource", id="resource-int"),
        pytest.param([ev("routed", 0, resource="")], 422, "invalid_resource", "resource", id="resource-empty"),
        pytest.param([ev("routed", 0, resource="1\n2")], 422, "invalid_resource", "resource", id="resource-control"),
        pytest.param([ev("routed", 0, resource="9" * 129)], 422, "invalid_resource", "resource", id="resource-long"),
        pytest.param([ev("queued", 10), ev("routed", 9, resource="1")], 422, "time_backwards", "at", id="backwards"),
        pytest.param([{**ev("queued", 0), "at": "yesterday"}], 400, "bad_time", "at", id="bad-time"),
        pytest.param([{**ev("queued", 0), "at": 1715677200}], 400, "wrong_type", "at", id="time-number"),
        pytest.param([ev("queued", 0, media="fax")], 422, "unknown_media", "media", id="unknown-media"),
        pytest.param([ev("queued", 0, media=1)], 400, "wrong_type", "media", id="media-int"),
        pytest.param([*ROUTED_CALL, ev("routed", 20, media="email", resource="1")], 422, "media_mismatch", "media", id="media-change"),
        pytest.param([ev("queued", 0, source=LONG)], 422, "too_long", "source", id="source-long"),
        pytest.param([ev("queued", 0, queue_name=5)], 400, "wrong_type", "queue_name", id="queue-int"),
        pytest.param([*ROUTED_CALL, ev("consulted", 20, from_=LONG, resource="1")], 422, "too_long", "from", id="from-long"),
        pytest.param([ev("queued", 0, contact_data=["a", "b"])], 400, "wrong_type", "contact_data", id="data-list"),
        pytest.param([ev("queued", 0, contact_data={"a": 1})], 400, "wrong_type", "contact_data", id="data-int"),
        pytest.param([ev("queued", 0, contact_data={f"k{i}": "v" for i in range(257)})], 422, "too_many_keys", "contact_data", id="data-keys"),
        pytest.param(
            [ev("queued", 0, contact_data={f"k{i}": "v" for i in range(200)}), ev("routed", 1, resource="1", contact_data={f"j{i}": "v" for i in range(57)})],
            422, "too_many_keys", "contact_data", id="data-keys-merged",
        ),
        pytest.param([ev("queued", 0, contact_data={"k": "v" * 4097})], 422, "too_long", "contact_data", id="data-value-long"),
        pytest.param([ev("queued", 0, contact_data={"k" * 4097: "v"})], 422, "too_long", "contact_data", id="data-key-long"),
        pytest.param([ev("routed", 0, resource="1", redirect="2")], 422, "unexpected_field", "redirect", id="redirect-on-routed"),
        pytest.param([ev("queued", 0, queue="Ventes")], 422, "unexpected_field", "queue", id="typo-field"),
        pytest.param([*ROUTED_CALL, ev("requeued", 20, destination="1369")], 422, "unexpected_field", "destination", id="requeue-destination"),
        pytest.param([*ENDED, ev("routed", 30, resource="1")], 422, "contact_ended", "event", id="after-ended"),
        pytest.param([*ENDED, ev("ended", 30)], 422, "contact_ended", "event", id="ended-twice"),
        pytest.param("queued", 400, "not_an_object", None, id="batch-string"),
        pytest.param([ev("queued", 0)] * (MAX_BATCH + 1), 422, "too_many_events", None, id="batch-too-big"),
    ],
)  # fmt: skip
def test_refusals(events, status, error, field):
    refused = refusal(events)
    assert (refused.status, refused.error, refused.field) == (status, error, field)
    assert refused.to_dict() == {
        "error": error,
        "message": refused.message,
        "field": field,
        "index": refused.index,
    }
    assert refused.message
    if isinstance(events, list) and len(events) <= MAX_BATCH:
        assert refused.index == len(events) - 1
        assert len(refused.applied) == len(events) - 1


def test_refusals_echo_at_most_64_characters_of_the_input():
    """An outside check got the whole 500,000-character name back in `field`, and 1,024
    characters of a media, where /v1/pops cut both to 64."""
    name = "x" * 500_000
    refused = refusal([ev("queued", 0, media="telephone", **{name: "1"})])
    assert (refused.error, refused.field) == ("unexpected_field", "x" * 64)
    assert refused.message == f"queued does not take {'x' * 64!r}"
    refused = refusal([ev("queued", 0, media="m" * 1024)])
    assert (refused.error, refused.field) == ("unknown_media", "media")
    assert refused.message == (
        f"unknown media {'m' * 64!r}… (expected telephone, callback, email, webcollab)"
    )


def test_an_unknown_media_says_the_same_for_a_pop_and_a_contact_event():
    from spop_cli.pops import InputError, normalize_pop

    with pytest.raises(InputError) as pop_refused:
        normalize_pop({"media": "fax", "resource": "13579"}, T0)
    refused = refusal([ev("queued", 0, media="fax")])
    assert refused.message == pop_refused.value.message
    assert refused.message == "unknown media 'fax' (expected telephone, callback, email, webcollab)"


def test_bad_event_at_index_2_keeps_the_first_two():
    tracker = ContactTracker()
    events = [ev("queued", 0, **SALES), ev("routed", 10, resource="13579"), ev("parked", 12)]
    refused = refusal(events, tracker)
    assert (refused.index, refused.error) == (2, "unknown_event")
    assert [len(o.pops) for o in refused.applied] == [0, 1]
    assert refused.applied[1].pops[0].resource == "13579"
    assert "event 2" in str(refused)
    # What was applied stays applied: the contact goes on from there.
    assert (
        play([ev("answered", 15, resource="13579"), ev("consulted", 20, resource="5")], tracker)[0][
            "wait_time"
        ]
        == 15
    )


def test_single_event_refusal_has_no_index():
    refused = refusal(ev("parked", 0))
    assert refused.index is None and refused.applied == []


def test_single_event_object_is_a_batch_of_one():
    outcomes = ContactTracker().apply_batch(ev("routed", 0, resource="1"), T0)
    assert [len(o.pops) for o in outcomes] == [1]


def test_refused_event_changes_nothing():
    tracker = ContactTracker()
    tracker.apply_batch(ROUTED_CALL, T0)
    with pytest.raises(ContactEventError):
        tracker.apply(ev("consulted", 20, resource="", contact_data={"new": "x"}, source="999"), T0)
    with pytest.raises(ContactEventError):
        tracker.apply(ev("routed", 30, media="email", resource="1", source="999"), T0)
    pop = tracker.apply(ev("consulted", 16, resource="54321"), T0).pops[0]
    assert (pop.source, pop.contact_data.keys()) == ("12345", ["code1"])


def test_error_str_names_code_and_message():
    refused = refusal([ev("routed", 0)])
    assert str(refused).startswith("missing_field: resource")


# Expiry runs on the hub clock (received_at), not on the sources' `at`.
def test_ended_contacts_are_forgotten_after_forget_after():
    tracker = ContactTracker(forget_after=300, idle_expiry=3600)
    tracker.apply_batch(ENDED, T0)
    tracker.apply_batch([ev("routed", 0, contact_id="call-2", resource="1")], T0)
    assert len(tracker) == 2
    assert tracker.expire(T0 + timedelta(seconds=299)) == 0
    assert tracker.expire(T0 + timedelta(seconds=300)) == 1
    assert len(tracker) == 1
    # Forgotten, the id may start a new contact.
    again = tracker.apply(ev("routed", 400, resource="1"), T0 + timedelta(seconds=400))
    assert again.pops[0].wait_time == 0 and len(tracker) == 2


def test_idle_contacts_are_forgotten_after_idle_expiry():
    tracker = ContactTracker(forget_after=300, idle_expiry=3600)
    tracker.apply(ev("queued", 0, contact_id="idle"), T0)
    tracker.apply(ev("queued", 0, contact_id="busy"), T0)
    later = T0 + timedelta(seconds=3000)
    tracker.apply({"contact_id": "busy", "event": "routed", "resource": "1"}, later)
    assert tracker.expire(T0 + timedelta(seconds=3599)) == 0
    assert tracker.expire(T0 + timedelta(seconds=3600)) == 1
    assert len(tracker) == 1
    with pytest.raises(ContactEventError) as caught:
        tracker.apply({"contact_id": "idle", "event": "answered", "resource": "1"}, later)
    assert caught.value.error == "unknown_contact"
    assert tracker.expire(later + timedelta(seconds=3600)) == 1
    assert len(tracker) == 0


def test_expiry_ignores_the_sources_clock():
    tracker = ContactTracker(idle_expiry=60)
    old = {"contact_id": "c", "event": "queued", "at": "2001-01-01T00:00:00Z"}
    tracker.apply(old, T0)
    assert tracker.expire(T0 + timedelta(seconds=59)) == 0
    assert tracker.expire(datetime(2024, 5, 14, 11, 1, tzinfo=timezone(timedelta(hours=2)))) == 1


def test_negative_expiry_is_refused():
    with pytest.raises(ValueError):
        ContactTracker(forget_after=-1)


def test_a_time_that_overflows_is_refused_and_earlier_events_stay_applied() -> None:
    from datetime import UTC, datetime

    from spop_cli.hub.contacts import ContactEventError, ContactTracker

    tracker = ContactTracker()
    now = datetime(2026, 1, 1, tzinfo=UTC)
    events = [
        {"contact_id": "c", "event": "routed", "resource": "13579"},
        {
            "contact_id": "c",
            "event": "answered",
            "resource": "13579",
            "at": "0001-01-01T00:00:00+01:00",
        },
    ]
    with pytest.raises(ContactEventError) as info:
        tracker.apply_batch(events, now)
    assert (info.value.status, info.value.field, info.value.index) == (400, "at", 1)
    assert len(info.value.applied) == 1 and info.value.applied[0].pops[0].resource == "13579"


# -- the state the journal keeps (issue 10): whole, and the same after a restore -------------------


def test_a_restored_contact_carries_on_exactly_as_the_original() -> None:
    import json

    lived = [
        ev("queued", 0, media="email", source="a@b.fr", queue_name="Q", contact_data={"k": "1"}),
        ev("routed", 10, resource="alice"),
        ev("answered", 12, resource="alice"),
        ev("requeued", 20, queue_name="Q2", contact_data={"k2": "2"}),
    ]
    then = [ev("routed", 35, resource="bob"), ev("transferred", 40, resource="carol")]
    original = ContactTracker()
    original.apply_batch(lived, T0)
    state = original.state("call-1")
    assert state is not None and json.loads(json.dumps(state)) == state  # plain JSON values
    assert {name: state[name] for name in ("media", "holder", "queue_name", "contact_data")} == {
        "media": "email",
        "holder": "alice",
        "queue_name": "Q2",
        "contact_data": {"k2": "2"},
    }
    assert (state["segment_start"], state["answered_at"]) == ("2024-05-14T09:00:20+00:00", None)
    restored = ContactTracker()
    assert restored.restore(json.loads(json.dumps(state))) == "call-1"
    assert restored.state("call-1") == state
    later = T0 + timedelta(seconds=50)
    assert pops_of(restored.apply_batch(then, later)) == pops_of(original.apply_batch(then, later))


def test_a_snapshot_put_back_undoes_every_change_since() -> None:
    tracker = ContactTracker()
    tracker.apply(ev("queued", 0, contact_data={"a": "1"}), T0)
    before = tracker.snapshot(["call-1", "call-2"])
    tracker.apply_batch(
        [ev("routed", 5, contact_data={"b": "2"}, resource="1"), ev("queued", 6, "call-2")], T0
    )
    tracker.put_back(before)
    assert len(tracker) == 1
    assert tracker.state("call-1")["contact_data"] == {"a": "1"}  # type: ignore[index]
    assert tracker.state("call-1")["holder"] == ""  # type: ignore[index]


def test_the_journalled_state_is_the_state_as_json_byte_for_byte() -> None:
    """`state_json` (the journal's row, made without copies) is `orjson.dumps(state())` at every
    step: times with and without fractions of a second, an answer, an end, followers, data."""
    import orjson

    tracker = ContactTracker()
    steps = [
        ev("queued", 0, media="telephone", **SALES),
        ev("routed", 10.25, resource="13579"),
        ev("answered", 15, resource="13579", contact_data={"clé": "välue"}),
        ev("transferred", 40.5, resource="54321"),
        ev("ended", 61.125),
    ]
    received = T0 + timedelta(seconds=0.123456)
    assert tracker.state_json("call-1") is None
    for step in steps:
        tracker.apply(step, received)
        state = tracker.state("call-1")
        assert tracker.state_json("call-1") == orjson.dumps(state)
        assert orjson.loads(tracker.state_json("call-1")) == state  # type: ignore[arg-type]
    assert state is not None and state["ended_seen"] == "2024-05-14T09:00:00.123456+00:00"
    assert state["answered_at"] == "2024-05-14T09:00:15+00:00"
    assert state["following"] == {}
    restored = ContactTracker()
    restored.restore(orjson.loads(tracker.state_json("call-1")))  # type: ignore[arg-type]
    assert restored.state("call-1") == state


def test_an_applied_event_leaves_a_snapshot_taken_before_it_untouched() -> None:
    """The tracker changes a copy of a contact and swaps it in: the snapshot (the objects as they
    were) still holds every field, data and followers included, as before the event."""
    tracker = ContactTracker()
    tracker.apply_batch([*ROUTED_CALL[:2]], T0)
    before_state = tracker.state("call-1")
    before = tracker.snapshot(["call-1"])
    tracker.apply_batch(
        [ev("answered", 15, resource="13579", contact_data={"more": "1"}), ev("ended", 20)], T0
    )
    assert tracker.state("call-1") != before_state
    tracker.put_back(before)
    assert tracker.state("call-1") == before_state


def test_each_pop_comes_with_its_wire_form_and_frame() -> None:
    """The hub sends the frame the tracker made (and sized against max_frame): it is the pop's."""
    from spop_cli.protocol import pop_frame

    tracker = ContactTracker(max_frame=65536)
    outcomes = tracker.apply_batch([{**e, "id": f"e{i}"} for i, e in enumerate(CONSULTATION)], T0)
    wires = [wire for outcome in outcomes for wire in outcome.wire]
    pops = [pop for outcome in outcomes for pop in outcome.pops]
    assert [pop.id for pop in pops] == ["e1", "e3"]
    assert [body for body, _ in wires] == [pop.to_dict() for pop in pops]
    assert [frame for _, frame in wires] == [pop_frame(pop.to_dict()) for pop in pops]
