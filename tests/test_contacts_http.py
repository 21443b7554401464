"""POST /v1/contacts through a real hub: the pops that reach real listeners, refusals, withdrawal."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from conftest import HubThread, wait_for
from guide_pops import EMPTY_POP as GUIDE_EMPTY_POP
from spop_cli import (
    Error,
    ScreenPopCallbackListener,
    ScreenPopEmailListener,
    ScreenPopError,
    ScreenPopTelephoneListener,
    ScreenPopWebCollaborationListener,
)
from spop_cli.hub.contacts import POP_EVENTS
from spop_cli.model import EVENT_CLASSES, Media
from spop_cli.scenario import builtin_names, load_scenario, timeline

START = datetime(2024, 5, 14, 9, 0, 0, tzinfo=UTC)
LISTENERS = {
    "telephone": ScreenPopTelephoneListener,
    "callback": ScreenPopCallbackListener,
    "email": ScreenPopEmailListener,
    "webcollab": ScreenPopWebCollaborationListener,
}
EMPTY_POP = {**GUIDE_EMPTY_POP, "contact_data": []}  # pairs, so order is compared


def post(hub: HubThread, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
    """POST /v1/contacts for real; (status, JSON answer)."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        hub.http + "/v1/contacts",
        data=data,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def http_status(hub: HubThread) -> dict[str, Any]:
    with urllib.request.urlopen(hub.http + "/v1/status", timeout=10) as response:
        return json.loads(response.read())


def at(seconds: float) -> str:
    return (
        datetime.fromtimestamp(START.timestamp() + seconds, UTC).isoformat().replace("+00:00", "Z")
    )


def fields(pop: Any) -> dict[str, Any]:
    """A received pop as comparable fields; contact_data as ordered pairs, so order counts."""
    wire = pop.to_dict()
    del wire["id"], wire["created_at"]
    return {**wire, "contact_data": list(wire["contact_data"].items())}


def expected(entry: dict[str, Any], suffix: str = "") -> dict[str, Any]:
    """A scenario's [[expect]] table as a whole pop: absent fields are empty."""
    pop = {**EMPTY_POP, **entry, "contact_data": list(entry.get("contact_data", {}).items())}
    pop["contact_id"] = entry["contact_id"] + suffix
    return pop


class Desk:
    """Blocking listeners on a hub, one per (media, resource), every pop they get in one list."""

    def __init__(self, hub: HubThread) -> None:
        self.hub = hub
        self.listeners: dict[tuple[str, str], Any] = {}
        self.pops: list[Any] = []
        self._lock = threading.Lock()

    def listen(self, media: str, resource: str) -> None:
        listener = LISTENERS[media](reconnecting_interval=0.3)
        listener.on_screen_pop(self._got)
        listener.initialize(self.hub.address)
        listener.start_listening(resource)
        self.listeners[media, resource] = listener

    def _got(self, pop: Any) -> None:
        with self._lock:
            self.pops.append(pop)

    def wait(self, count: int) -> bool:
        return wait_for(lambda: len(self.pops) >= count)

    def by_id(self, ids: list[str]) -> list[Any]:
        """The pops received with these ids, in the order of the ids."""
        with self._lock:
            received = {pop.id: pop for pop in self.pops}
        return [received[pop_id] for pop_id in ids]

    def close(self) -> None:
        for listener in self.listeners.values():
            listener.shutdown()


@pytest.fixture
def desk(hub: HubThread) -> Iterator[Desk]:
    opened = Desk(hub)
    yield opened
    opened.close()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# --- every builtin scenario, every media ---------------------------------------------------


def test_builtins_cover_every_media() -> None:
    media = {e["media"] for name in builtin_names() for e in load_scenario(name).expect}
    assert media == {m.value for m in Media}


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_scenario_pops_reach_the_listeners(hub: HubThread, desk: Desk, name: str) -> None:
    scenario = load_scenario(name)
    suffix = f"-{uuid.uuid4().hex[:8]}"
    for entry in scenario.expect:
        if (entry["media"], entry["resource"]) not in desk.listeners:
            desk.listen(entry["media"], entry["resource"])
    events = timeline(scenario, START, contact_suffix=suffix)

    status, answer = post(hub, events)

    assert status == 200
    assert answer["applied"] == len(events)
    assert len(answer["pops"]) == len(scenario.expect)
    assert desk.wait(len(scenario.expect))
    pops = desk.by_id(answer["pops"])
    assert [fields(pop) for pop in pops] == [expected(e, suffix) for e in scenario.expect]
    assert [type(pop) for pop in pops] == [
        EVENT_CLASSES[Media(e["media"])] for e in scenario.expect
    ]
    # each pop is stamped with the time of the event that made it
    assert [pop.created_at for pop in pops] == [e["at"] for e in events if e["event"] in POP_EVENTS]
    assert len(desk.pops) == len(scenario.expect)


# --- the guide's three tables (SPEC §2), written out ---------------------------------------

GUIDE_CALL = [
    {
        "event": "queued",
        "media": "telephone",
        "source": "12345",
        "destination": "2468",
        "queue_name": "File d'attente des ventes",
        "contact_description": "Ventes",
        "contact_data": {"code1": "chaîne1"},
        "at": at(0),
    },
    {"event": "routed", "resource": "13579", "at": at(10)},
    {"event": "answered", "resource": "13579", "at": at(15)},
]
GUIDE_TABLES = {
    "2.2.1 routed call": (
        [],
        {
            "media": "telephone",
            "resource": "13579",
            "source": "12345",
            "destination": "2468",
            "queue_name": "File d'attente des ventes",
            "contact_description": "Ventes",
            "contact_data": [("code1", "chaîne1")],
            "wait_time": 10,
            "from": "",
            "redirect": "",
        },
    ),
    "2.2.2 consultation": (
        [{"event": "consulted", "from": "13579", "resource": "54321", "at": at(40)}],
        {
            "media": "telephone",
            "resource": "54321",
            "source": "12345",
            "destination": "2468",
            "queue_name": "File d'attente des ventes",
            "contact_description": "Ventes",
            "contact_data": [("code1", "chaîne1")],
            "wait_time": 15,
            "from": "13579",
            "redirect": "",
        },
    ),
    "2.2.3 requeue": (
        [
            {
                "event": "requeued",
                "queue_name": "File d'attente Service",
                "contact_description": "Service",
                "contact_data": {"code2": "chaîne2"},
                "at": at(45),
            },
            {"event": "routed", "resource": "1111", "at": at(50)},
        ],
        {
            "media": "telephone",
            "resource": "1111",
            "source": "12345",
            "destination": "2468",
            "queue_name": "File d'attente Service",
            "contact_description": "Service",
            "contact_data": [("code2", "chaîne2")],
            "wait_time": 5,
            "from": "",
            "redirect": "",
        },
    ),
}


@pytest.mark.parametrize("table", list(GUIDE_TABLES))
def test_guide_table_field_for_field(hub: HubThread, desk: Desk, table: str) -> None:
    then, table_pop = GUIDE_TABLES[table]
    contact = unique("guide")
    desk.listen("telephone", table_pop["resource"])
    events = [{"contact_id": contact, **event} for event in GUIDE_CALL + then]

    status, answer = post(hub, events)

    assert status == 200 and answer["applied"] == len(events)
    assert desk.wait(1)
    [pop] = desk.by_id(answer["pops"][-1:])
    assert type(pop).__name__ == "ScreenPopTelephoneEvent"
    assert fields(pop) == {**table_pop, "contact_id": contact}
    assert pop.extension == table_pop["resource"] and pop.from_ == table_pop["from"]
    key, value = table_pop["contact_data"][0]
    assert len(pop.contact_data) == 1 and pop.contact_data[key] == value
    with pytest.raises(ScreenPopError) as missing:
        pop.contact_data["code3"]
    assert missing.value.code is Error.SCREENPOP_Wrong_Key


# --- refusals --------------------------------------------------------------------------------

REFUSED = [
    # (case, events applied first, the refused event, status, error, field)
    ("unknown event", [], {"event": "hung_up"}, 422, "unknown_event", "event"),
    (
        "unknown contact",
        [],
        {"event": "answered", "resource": "13579"},
        422,
        "unknown_contact",
        "contact_id",
    ),
    ("missing resource", [], {"event": "routed"}, 422, "missing_field", "resource"),
    (
        "time going backwards",
        [{"event": "queued", "at": at(10)}],
        {"event": "routed", "resource": "13579", "at": at(9)},
        422,
        "time_backwards",
        "at",
    ),
    (
        "contact_id a number",
        [],
        {"event": "queued", "contact_id": 5},
        400,
        "wrong_type",
        "contact_id",
    ),
    (
        "resource a number",
        [],
        {"event": "routed", "resource": 13579},
        400,
        "wrong_type",
        "resource",
    ),
    (
        "data not strings",
        [],
        {"event": "queued", "contact_data": {"n": 1}},
        400,
        "wrong_type",
        "contact_data",
    ),
    ("at a number", [], {"event": "queued", "at": 1715677200}, 400, "wrong_type", "at"),
    ("at not a time", [], {"event": "queued", "at": "yesterday"}, 400, "bad_time", "at"),
    (
        "misspelt field",
        [],
        {"event": "queued", "queue": "Ventes"},
        422,
        "unexpected_field",
        "queue",
    ),
    (
        "destination on requeued",
        [{"event": "queued"}],
        {"event": "requeued", "destination": "1369"},
        422,
        "unexpected_field",
        "destination",
    ),
    ("unknown media", [], {"event": "queued", "media": "fax"}, 422, "unknown_media", "media"),
    (
        "another media",
        [{"event": "queued", "media": "telephone"}],
        {"event": "routed", "media": "email", "resource": "x"},
        422,
        "media_mismatch",
        "media",
    ),
    (
        "after ended",
        [{"event": "queued"}, {"event": "ended"}],
        {"event": "routed", "resource": "13579"},
        422,
        "contact_ended",
        "event",
    ),
]


@pytest.mark.parametrize(
    "before, event, status, error, field",
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_refused_event_names_the_problem(
    hub: HubThread,
    before: list[dict[str, Any]],
    event: dict[str, Any],
    status: int,
    error: str,
    field: str,
) -> None:
    contact = unique("bad")
    if before:
        assert post(hub, [{"contact_id": contact, **e} for e in before])[0] == 200

    answer = post(hub, {"contact_id": contact, **event})

    assert answer[0] == status
    assert answer[1] == {
        "error": error,
        "message": answer[1]["message"],
        "field": field,
        "index": None,
        "applied": 0,
        "pops": [],
    }
    assert answer[1]["message"]
    assert http_status(hub)["counters"]["rejected"] == 1


MALFORMED = [
    (b"{not json", "invalid_json"),
    (b"", "invalid_json"),
    (b'[{"contact_id": "x"', "invalid_json"),
    (b"[" * 200 + b"]" * 200, "too_deep"),
]


@pytest.mark.parametrize("raw, error", MALFORMED, ids=["garbage", "empty", "cut", "deep"])
def test_malformed_body_is_refused(hub: HubThread, raw: bytes, error: str) -> None:
    status, answer = post(hub, raw=raw)
    assert status == 400
    assert answer["error"] == error and answer["applied"] == 0 and answer["pops"] == []


@pytest.mark.parametrize("body", ["queued", 7, None, [1]])
def test_body_neither_event_nor_array_is_refused(hub: HubThread, body: Any) -> None:
    status, answer = post(hub, body)
    assert (status, answer["error"]) == (400, "not_an_object")


def test_refused_event_changes_nothing(hub: HubThread, desk: Desk) -> None:
    contact = unique("kept")
    desk.listen("telephone", "13579")
    queued = {"contact_id": contact, "event": "queued", "queue_name": "Ventes", "at": at(0)}
    assert post(hub, queued)[0] == 200
    refused = [
        {"contact_id": contact, "event": "routed", "resource": "13579", "at": at(-5)},
        {"contact_id": contact, "event": "routed", "resource": "13579", "queue": "x", "at": at(3)},
    ]
    for event in refused:
        assert post(hub, event)[0] == 422

    status, answer = post(
        hub, {"contact_id": contact, "event": "routed", "resource": "13579", "at": at(7)}
    )

    assert status == 200
    assert desk.wait(1)
    [pop] = desk.by_id(answer["pops"])
    assert (pop.queue_name, pop.wait_time) == ("Ventes", 7)
    assert len(desk.pops) == 1


def test_bad_event_in_an_array_keeps_the_events_before_it(hub: HubThread, desk: Desk) -> None:
    contact, later = unique("direct"), unique("later")
    desk.listen("telephone", "13579")
    desk.listen("telephone", "54321")
    events = [
        {"contact_id": contact, "event": "routed", "source": "0145678900", "resource": "13579"},
        {"contact_id": contact, "event": "transferred", "resource": "54321"},
        {"contact_id": contact, "event": "hung_up"},
        {"contact_id": later, "event": "routed", "resource": "13579"},
    ]

    status, answer = post(hub, events)

    assert status == 422
    assert (answer["error"], answer["field"], answer["index"]) == ("unknown_event", "event", 2)
    assert answer["applied"] == 2 and len(answer["pops"]) == 2
    assert desk.wait(2)
    first, second = desk.by_id(answer["pops"])
    assert (first.resource, first.source, first.from_) == ("13579", "0145678900", "")
    assert (second.resource, second.source, second.from_) == ("54321", "0145678900", "13579")
    # the event after the bad one was not applied: its contact does not exist
    assert http_status(hub)["contacts"] == 1
    refused = post(hub, {"contact_id": later, "event": "answered", "resource": "13579"})
    assert refused[1]["error"] == "unknown_contact"
    assert len(desk.pops) == 2


# --- ended withdraws, status counts --------------------------------------------------------


def test_ended_withdraws_undelivered_pops(hub: HubThread, desk: Desk) -> None:
    contact = unique("gone")
    events = [
        {"contact_id": contact, "event": "queued", "source": "12345", "at": at(0)},
        {"contact_id": contact, "event": "routed", "resource": "13579", "at": at(10)},
    ]
    status, answer = post(hub, events)
    assert status == 200 and len(answer["pops"]) == 1
    # a pop posted directly for the same contact goes too
    hub.publish({"media": "telephone", "resource": "13579", "contact_id": contact})
    assert http_status(hub)["pending"] == 2

    status, answer = post(hub, {"contact_id": contact, "event": "ended", "at": at(20)})

    assert (status, answer) == (200, {"applied": 1, "pops": []})
    after = http_status(hub)
    assert after["pending"] == 0 and after["counters"]["withdrawn"] == 2
    desk.listen("telephone", "13579")
    # pending pops go out as a listener registers, before any later pop: a marker proves none came
    [marker] = hub.publish({"media": "telephone", "resource": "13579", "source": "marker"})
    assert desk.wait(1)
    assert [pop.id for pop in desk.pops] == [marker]


def test_status_counts_the_contacts_tracked(hub: HubThread) -> None:
    assert http_status(hub)["contacts"] == 0
    first, second, third = unique("a"), unique("b"), unique("c")
    events = [
        {"contact_id": first, "event": "queued"},
        {"contact_id": second, "event": "routed", "resource": "13579"},
        {"contact_id": third, "event": "queued", "media": "email"},
        {"contact_id": third, "event": "ended"},
    ]
    assert post(hub, events)[0] == 200

    status = http_status(hub)

    # an ended contact is remembered (late events are refused) until it is forgotten
    assert status["contacts"] == 3
    assert status["counters"]["contact_events"] == 4
    assert status == hub.status() | {"uptime": status["uptime"]}


def test_ended_contacts_are_forgotten_after_forget_after() -> None:
    quick = HubThread(contact_forget_after=0, heartbeat=0.2)
    try:
        contact = unique("short")
        events = [
            {"contact_id": contact, "event": "queued"},
            {"contact_id": contact, "event": "ended"},
        ]
        assert post(quick, events)[0] == 200
        assert wait_for(lambda: http_status(quick)["contacts"] == 0)
        # forgotten: the id may start a new contact
        assert post(quick, {"contact_id": contact, "event": "queued"})[0] == 200
        assert http_status(quick)["contacts"] == 1
    finally:
        quick.close()
