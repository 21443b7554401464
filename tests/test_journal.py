"""Durable: an accepted pop is in the SQLite journal before the source hears `ok`, and a hub killed
with SIGKILL and started again on the same journal delivers every pop it had accepted."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
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
from spop_cli.hub.journal import Journal
from spop_cli.hub.server import default_journal_path
from spop_cli.serve import build_hub_config


def rows(path: Path) -> dict[str, int]:
    """id → done, read by another connection, as a crash would find them."""
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT id, done FROM pops"))


def reopen(path: Path, retain: float = 60) -> tuple[list[Any], Journal]:
    """Open the journal as a starting hub would, read what it restores, close it again."""
    journal = Journal(path, retain=retain)
    found = journal.open()
    run(journal.close())
    return found, journal


# -- the journal alone -----------------------------------------------------------------------


def test_journal_commits_in_batches_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        journal = Journal(path, retain=60)
        assert journal.open() == []
        journal.start()
        adds = [
            journal.add(f"p{i}", "telephone", "1", "", b"{}", time.time() + 60) for i in range(2000)
        ]
        await asyncio.gather(*adds)
        assert len(rows(path)) == 2000  # committed when the futures resolve
        assert journal.commits <= 20  # batched, not one commit per pop
        journal.done("p0")
        await journal.close()  # commits what is queued

    run(body())
    reopened, _ = reopen(path)
    assert len(reopened) == 2000
    assert [r.id for r in reopened if r.done] == ["p0"]
    assert reopened[1].media == "telephone" and reopened[1].body == b"{}"


def test_journal_forgets_expired_and_old_rows_on_open(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        journal = Journal(path, retain=60)
        journal.open()
        journal.start()
        await asyncio.gather(
            journal.add("expired", "telephone", "1", "", b"{}", time.time() - 1),
            journal.add("live", "telephone", "1", "", b"{}", time.time() + 60),
            journal.add("handled", "telephone", "1", "", b"{}", time.time() + 60),
        )
        journal.done("handled")
        await journal.close()

    run(body())
    # within the duplicate window every id is kept (the expired one too, to stay a duplicate;
    # it is marked done and reported as expired while the hub was down)
    found, reopened = reopen(path)
    assert {(r.id, r.done) for r in found} == {
        ("expired", True),
        ("live", False),
        ("handled", True),
    }
    assert reopened.expired_while_down == [("expired", "telephone", "1")]
    # past it, only what is still owed: a pending pop outlives the window when pop_ttl is longer
    assert [(r.id, r.done) for r in reopen(path, retain=0)[0]] == [("live", False)]


def test_a_failed_commit_is_an_error_to_the_source_and_the_journal_recovers(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        async with inprocess_hub(journal=str(path)) as hub:
            hub.journal._db.execute("PRAGMA busy_timeout = 50")
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
            status, answer = await asyncio.to_thread(
                http_post, f"{http_of(hub)}/v1/pops", pop(id="blocked-http")
            )
            assert status == 503 and answer["error"] == "journal_unavailable"
            assert answer["message"] == (
                "the journal cannot be written (database is locked): nothing was accepted; retry later"
            )
            with pytest.raises(Exception, match="locked"):
                await client.publish(address_of(hub), pop(id="blocked-frame"))
            blocker.execute("ROLLBACK")
            blocker.close()
            assert await client.publish(address_of(hub), pop(id="after")) == ["after"]
            assert "after" in rows(path)

    run(body())


# -- accepted means committed ------------------------------------------------------------------


def test_ok_and_2xx_come_after_the_commit(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        async with inprocess_hub(journal=str(path)) as hub:
            for i in range(20):
                [pop_id] = await client.publish(address_of(hub), pop(source=str(i)))
                assert pop_id in rows(path)
                status, answer = await asyncio.to_thread(
                    http_post, f"{http_of(hub)}/v1/pops", [pop(), pop()]
                )
                assert status == 200 and set(answer["ids"]) <= set(rows(path))

    run(body())


def test_default_journal_location() -> None:
    assert build_hub_config().journal == str(default_journal_path())
    assert default_journal_path().name == "journal.sqlite3"
    assert build_hub_config(no_journal=True).journal is None


# -- across restarts -----------------------------------------------------------------------------


def test_sigkill_loses_no_accepted_pop(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path).start()
    try:
        sent = [client_publish(hub.address, pop("13579", source=str(i))) for i in range(50)]
        status, answer = http_post(
            f"{hub.http}/v1/pops", [pop("13579", source=f"h{i}") for i in range(50)]
        )
        sent += answer["ids"]
        hub.restart()  # SIGKILL right after the last `ok`, then the same ports and journal

        async def body() -> None:
            listener = await Counting().up(hub.address, "13579")
            assert await until(lambda: len(listener.calls) == 100, 10)
            assert set(listener.calls) == set(sent) and listener.twice() == []
            await listener.listener.shutdown()

        run(body())
    finally:
        hub.kill()


def client_publish(address: str, body: Any) -> str:
    return run(client.publish(address, body))[0]


def test_acked_pops_are_not_redelivered_after_a_restart_and_ids_stay_duplicates(
    tmp_path: Path,
) -> None:
    hub = HubProcess(tmp_path).start()
    try:

        async def handled() -> None:
            listener = await Counting().up(hub.address, "13579")
            await client.publish(hub.address, [pop(id=f"call-{i}") for i in range(10)])
            assert await until(lambda: len(listener.calls) == 10)
            await listener.listener.shutdown()

        run(handled())
        hub.stop()  # SIGTERM: the acks are committed on the way out
        assert all(rows(hub.journal).values())
        hub.start()

        async def after() -> None:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            await raw.request("register", media="telephone", resource="13579")
            # resent by a source that never heard back: still the same pops
            assert await client.publish(hub.address, pop(id="call-3")) == ["call-3"]
            await client.publish(hub.address, pop(source="marker"))
            assert (await raw.frame())["pop"]["source"] == "marker"  # nothing came before it
            status = await client.fetch_status_async(hub.address)
            assert status["counters"]["duplicates"] == 1
            raw.close()

        run(after())
    finally:
        hub.kill()


def test_expired_pops_are_not_restored_but_stay_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        async with inprocess_hub(journal=str(path), pop_ttl=0.2) as hub:
            await hub.publish(pop(id="late"))
        await asyncio.sleep(0.3)
        async with inprocess_hub(journal=str(path), pop_ttl=0.2) as hub:
            assert hub.status()["pending"] == 0
            await hub.publish(pop(id="late"))
            assert hub.status()["counters"]["duplicates"] == 1

    run(body())


def test_pending_pops_outlive_a_shorter_duplicate_window(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        async with inprocess_hub(journal=str(path), pop_ttl=60, dedupe_window=0.1) as hub:
            await hub.publish(pop(id="still-owed"))
        await asyncio.sleep(1.1)  # past the window (at least 1 s in the journal)
        async with inprocess_hub(journal=str(path), pop_ttl=60, dedupe_window=0.1) as hub:
            assert list(hub.delivery.pending) == ["still-owed"]

    run(body())


def test_a_batch_whose_pops_were_all_handled_before_the_write_still_answers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A pop acked before its batch is written is dropped from the batch; its source still
    waits on the batch's commit, which must resolve although nothing is left to write."""

    async def body() -> None:
        journal = Journal(tmp_path / "j.sqlite3")
        journal.open()
        journal.start()
        commit = journal.add("hub-made", "telephone", "1", "", b"{}", time.time() + 60, remember=False)
        journal.done("hub-made")  # acked in the same loop iteration, before the writer ran
        await asyncio.wait_for(commit, 5)
        kept = journal.add("source-id", "telephone", "1", "", b"{}", time.time() + 60, remember=True)
        journal.done("source-id")
        await asyncio.wait_for(kept, 5)
        await journal.close()

    run(body())
    rows = sqlite3.connect(tmp_path / "j.sqlite3").execute("SELECT id, done, body FROM pops").fetchall()
    assert rows == [("source-id", 1, b"")]  # the source's id stays a duplicate; no body kept


def test_a_resend_after_a_failed_commit_waits_for_the_retried_commit(tmp_path: Path) -> None:
    """The failed batch's rows are tried again first; a source resending one of them (same id)
    is answered only once its row is on disk, never `ok` for a row that was not written."""
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        async with inprocess_hub(journal=str(path)) as hub:
            hub.journal._db.execute("PRAGMA busy_timeout = 50")
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(Exception, match="locked"):
                await client.publish(address_of(hub), pop(id="retry-me"))
            # while the database stays locked, a resend is refused again, never `ok`
            with pytest.raises(Exception, match="locked"):
                await client.publish(address_of(hub), pop(id="retry-me"))
            assert "retry-me" not in rows(path)
            blocker.execute("ROLLBACK")
            blocker.close()
            assert await client.publish(address_of(hub), pop(id="retry-me")) == ["retry-me"]
            assert "retry-me" in rows(path)  # the `ok` came with the row on disk

    run(body())


def test_one_cancelled_caller_does_not_cancel_the_batch_for_the_others(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        async with inprocess_hub(journal=str(path)) as hub:
            impatient = asyncio.ensure_future(hub.publish(pop(id="impatient")))
            patient = asyncio.ensure_future(hub.publish(pop(id="patient")))
            await asyncio.sleep(0)  # both accepted into the same batch
            impatient.cancel()
            assert await asyncio.wait_for(patient, 5) == ["patient"]
            assert {"impatient", "patient"} <= set(rows(path))

    run(body())
