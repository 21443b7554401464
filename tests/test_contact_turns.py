"""Requests about the same contact take turns in the order they came while their journal commits
are under way, and a refused event need not stop a source's batch. A source inside the hub (the
Asterisk source, up to 32 batches in flight) relies on both: a later event of a call must never be
applied before an earlier one. A real hub in process with a real SQLite journal."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from hubproc import inprocess_hub, run
from spop_cli.hub.contacts import ContactEventError
from spop_cli.hub.journal import JournalUnavailable

T = "2026-03-02T09:00:{:02d}Z"  # event times, one a second


def event(contact: str, kind: str, second: int, **extra: Any) -> dict[str, Any]:
    return {"contact_id": contact, "event": kind, "at": T.format(second), **extra}


def journalled_pop(path: Path, pop_id: str) -> dict[str, Any]:
    with sqlite3.connect(path) as db:
        (body,) = db.execute("SELECT body FROM pops WHERE id = ?", (pop_id,)).fetchone()
    return orjson.loads(body)["pop"]


def test_a_request_waiting_its_turn_keeps_its_place_for_its_other_contacts(tmp_path: Path) -> None:
    """The first request is about a; the second about a and b waits for the first's commit; the
    third, about b only, came after the second: it waits for it too. (It was applied at once:
    b's `routed` before b's `queued`, which was then refused as going back in time.)"""
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        async with inprocess_hub(journal=str(path)) as hub:
            queued = event("b", "queued", 2, source="+49891234", queue_name="support")
            first = hub.apply_contacts(event("a", "queued", 0))
            second = hub.apply_contacts([event("a", "routed", 1, resource="1001"), queued])
            third = hub.apply_contacts(event("b", "routed", 3, resource="1002"))
            # tasks start in the order made, as a source's batches in flight do
            answers = await asyncio.gather(*map(asyncio.ensure_future, (first, second, third)))
            assert [a["applied"] for a in answers] == [1, 2, 1]
            pop = journalled_pop(path, answers[2]["pops"][0])
            assert (pop["resource"], pop["source"], pop["queue_name"]) == (
                "1002",
                "+49891234",
                "support",
            )
            assert hub._contact_turns == {}  # every turn over

    run(body())


def test_requests_lined_up_behind_a_refused_commit_are_refused_too(tmp_path: Path) -> None:
    """The first request's commit fails (the journal is locked), and the lock is gone at once: the
    two requests that waited behind it about the same contact must not be applied now (before
    the first one is sent again), so they get the same 503, and nothing of any of them happened."""
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        async with inprocess_hub(journal=str(path)) as hub:
            await hub.apply_contacts(event("a", "queued", 0))
            hub.journal._db.execute("PRAGMA busy_timeout = 0")
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            batches = [
                event("a", "routed", 1, resource="1001"),
                event("a", "answered", 2, resource="1001"),
                event("a", "ended", 3),
            ]
            requests = [asyncio.ensure_future(hub.apply_contacts(b)) for b in batches]
            await asyncio.sleep(0)  # the first staged in the journal's open batch, two in line
            # the lock goes as soon as that batch failed: before the second's turn comes
            hub.journal.barrier().add_done_callback(lambda _: blocker.execute("ROLLBACK"))
            outcomes = await asyncio.gather(*requests, return_exceptions=True)
            assert [str(o) for o in outcomes] == [
                "the journal cannot be written (database is locked): nothing was accepted; "
                "retry later"
            ] * 3
            assert all(isinstance(o, JournalUnavailable) for o in outcomes)
            state = hub.contacts.state("a")
            assert (state["holder"], state["ended_seen"]) == ("", None)  # none happened
            blocker.close()
            for batch in batches:  # sent again in order: all applied
                assert (await hub.apply_contacts(batch))["applied"] == 1
            state = hub.contacts.state("a")
            assert state["holder"] == "1001" and state["ended_seen"] is not None
            assert hub._contact_turns == {}

    run(body())


def test_a_cancelled_request_in_line_passes_its_turn_on_only_after_those_ahead(
    tmp_path: Path,
) -> None:
    """A request waiting in line is cancelled (its caller went away): the one behind it still
    waits for the one ahead of both, and then goes."""
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        async with inprocess_hub(journal=str(path)) as hub:
            first = asyncio.ensure_future(hub.apply_contacts(event("a", "queued", 0)))
            second = asyncio.ensure_future(
                hub.apply_contacts(event("a", "routed", 1, resource="1001"))
            )
            third = asyncio.ensure_future(
                hub.apply_contacts(event("a", "routed", 2, resource="1002"))
            )
            await asyncio.sleep(0)  # all three started: the first staged, two in line
            second.cancel()
            assert (await third)["applied"] == 1
            assert first.done() and (await first)["applied"] == 1
            assert second.cancelled()
            assert sorted(hub.contacts.state("a")["following"]) == ["1002"]
            assert hub._contact_turns == {}

    run(body())


@pytest.mark.parametrize("journal", [True, False])
def test_skip_refused_applies_the_events_after_a_refused_one_in_order(
    journal: bool, tmp_path: Path
) -> None:
    """`skip_refused` (a source inside the hub): each refused event is skipped and named with its
    index in the batch; the events after it are applied in the same request. Without it the
    batch stops at the first refusal, as `POST /v1/contacts` does."""
    batch = [
        event("a", "queued", 0),
        event("x", "answered", 1, resource="1001"),  # no such contact
        event("a", "routed", 2, resource="1001"),
        event("y", "ended", 3),  # no such contact
        event("a", "answered", 4, resource="1001"),
    ]

    async def body() -> None:
        options = {"journal": str(tmp_path / "journal.sqlite3")} if journal else {}
        async with inprocess_hub(**options) as hub:
            answer = await hub.apply_contacts(batch, skip_refused=True)
            assert (answer["applied"], len(answer["pops"])) == (3, 1)
            assert [(r.index, r.error) for r in answer["refused"]] == [
                (1, "unknown_contact"),
                (3, "unknown_contact"),
            ]
            assert hub.contacts.state("a")["holder"] == "1001"
            fresh = [
                {**e, "contact_id": "b" if e["contact_id"] == "a" else e["contact_id"]}
                for e in batch
            ]
            with pytest.raises(ContactEventError) as refused:
                await hub.apply_contacts(fresh)
            assert (refused.value.index, refused.value.applied_result["applied"]) == (1, 1)  # type: ignore[attr-defined]
            assert hub.contacts.state("b")["holder"] == ""

    run(body())
