"""The rules of contact updates (docs/contacts.md "Updates"), one test per row of its table:
ContactTracker alone, no sockets (the hub delivering them is tests/test_contact_updates.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from spop_cli.hub.contacts import ContactTracker

NOW = datetime(2024, 5, 14, 9, 0, 0, tzinfo=UTC)


def ev(kind: str, second: int, **fields: Any) -> dict[str, Any]:
    return {
        "contact_id": "c",
        "event": kind,
        "at": f"2024-05-14T09:{second // 60:02d}:{second % 60:02d}Z",
        **fields,
    }


QUEUED = ev("queued", 0, queue_name="Ventes")
ANSWERED_AT_A = [QUEUED, ev("routed", 5, resource="A"), ev("answered", 8, resource="A")]


def last_changes(events: list[dict[str, Any]]) -> tuple[list[tuple[Any, ...]], list[str]]:
    """The changes the last event makes (resource, change, fields set), and who follows after."""
    tracker = ContactTracker()
    outcomes = tracker.apply_batch(events, NOW)
    made = [
        (
            c.resource,
            c.change,
            {k: v for k, v in c.to_dict().items() if k in FIELDS and v not in ("", 0)},
            c.takes_back,
        )
        for c in outcomes[-1].changes
    ]
    state = tracker.state("c")
    return made, list(state["following"]) if state else []


FIELDS = ("answered_by", "transferred_to", "consulted", "talk_time", "wait_time", "reason")

ROWS: dict[str, tuple[list[dict[str, Any]], list[tuple[Any, ...]], list[str]]] = {
    "queued, routed: none": (
        [QUEUED, ev("routed", 5, resource="A"), ev("routed", 5, resource="B")],
        [],
        ["A", "B"],
    ),
    "answered, first of the segment": (
        [
            QUEUED,
            ev("routed", 5, resource="A"),
            ev("routed", 5, resource="B"),
            ev("answered", 9, resource="B"),
        ],
        [
            (
                "A",
                "answered",
                {"answered_by": "B", "wait_time": 9, "reason": "answered elsewhere"},
                True,
            ),
            ("B", "answered", {"answered_by": "B", "wait_time": 9}, False),
        ],
        ["B"],
    ),
    "answered, later": (
        [*ANSWERED_AT_A, ev("consulted", 20, resource="C"), ev("answered", 22, resource="C")],
        [
            ("A", "answered", {"answered_by": "C", "wait_time": 8}, False),
            ("C", "answered", {"answered_by": "C", "wait_time": 8}, False),
        ],
        ["A", "C"],
    ),
    "picked_up": (
        [QUEUED, ev("routed", 5, resource="A"), ev("picked_up", 12, resource="P")],
        [("A", "answered", {"answered_by": "P", "wait_time": 12, "reason": "picked up"}, True)],
        ["P"],
    ),
    "consulted": (
        [*ANSWERED_AT_A, ev("consulted", 20, resource="C")],
        [("A", "consulted", {"consulted": "C", "wait_time": 8}, False)],
        ["A", "C"],
    ),
    "conferenced": (
        [*ANSWERED_AT_A, ev("conferenced", 20, resource="C")],
        [("A", "conferenced", {"wait_time": 8, "reason": "joined by C"}, False)],
        ["A", "C"],
    ),
    "invited": (
        [*ANSWERED_AT_A, ev("invited", 20, resource="C")],
        [("A", "conferenced", {"wait_time": 8, "reason": "invited C"}, False)],
        ["A", "C"],
    ),
    "transferred": (
        [*ANSWERED_AT_A, ev("transferred", 40, resource="T")],
        [("A", "transferred", {"transferred_to": "T", "wait_time": 8}, False)],
        ["T"],
    ),
    "redirected": (
        [QUEUED, ev("routed", 5, resource="A"), ev("redirected", 25, resource="F")],
        [
            (
                "A",
                "transferred",
                {"transferred_to": "F", "wait_time": 25, "reason": "redirected"},
                False,
            )
        ],
        ["F"],
    ),
    "recalled": (
        [*ANSWERED_AT_A, ev("transferred", 40, resource="T"), ev("recalled", 60, resource="A")],
        [
            (
                "T",
                "transferred",
                {"transferred_to": "A", "wait_time": 8, "reason": "recalled"},
                False,
            )
        ],
        ["A"],
    ),
    "resumed": (
        [*ANSWERED_AT_A, ev("consulted", 20, resource="C"), ev("resumed", 90, resource="A")],
        [("C", "transferred", {"transferred_to": "A", "wait_time": 8, "reason": "resumed"}, False)],
        ["A"],
    ),
    "requeued": (
        [*ANSWERED_AT_A, ev("requeued", 30, queue_name="Service")],
        [("A", "requeued", {"reason": "Service"}, False)],
        [],
    ),
    "ended, answered": (
        [*ANSWERED_AT_A, ev("ended", 68)],
        [("A", "ended", {"talk_time": 60, "wait_time": 8}, True)],
        [],
    ),
    "ended, never answered": (
        [QUEUED, ev("routed", 5, resource="A"), ev("ended", 20)],
        [("A", "ended", {"wait_time": 20, "reason": "abandoned"}, True)],
        [],
    ),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_updates_table_row(row: str) -> None:
    events, changes, following = ROWS[row]
    assert last_changes(events) == (changes, following)


def test_following_survives_state_and_restore():
    """The resources following a contact are in its journalled state: a restored tracker sends
    the next event's changes to them."""
    tracker = ContactTracker()
    tracker.apply_batch([QUEUED, ev("routed", 5, resource="A")], NOW)
    state = tracker.state("c")
    restored = ContactTracker()
    restored.restore(state)
    [outcome] = restored.apply_batch([ev("answered", 8, resource="A")], NOW)
    assert [(c.resource, c.change, c.pop_id) for c in outcome.changes] == [
        ("A", "answered", state["following"]["A"])
    ]


def test_state_without_following_restores_as_no_follower():
    """A state journalled before updates existed has no `following`: nobody follows it."""
    tracker = ContactTracker()
    tracker.apply_batch([QUEUED, ev("routed", 5, resource="A")], NOW)
    state = tracker.state("c")
    del state["following"]
    restored = ContactTracker()
    restored.restore(state)
    assert restored.apply_batch([ev("answered", 8, resource="A")], NOW)[0].changes == []


def test_refused_commit_puts_following_back():
    tracker = ContactTracker()
    tracker.apply_batch([QUEUED, ev("routed", 5, resource="A")], NOW)
    before = tracker.snapshot({"c"})
    tracker.apply_batch([ev("transferred", 9, resource="T")], NOW)
    assert list(tracker.state("c")["following"]) == ["T"]
    tracker.put_back(before)
    assert list(tracker.state("c")["following"]) == ["A"]
