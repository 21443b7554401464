"""Durable: an accepted pop is in the SQLite journal before the source hears `ok`, and a hub killed
with SIGKILL and started again on the same journal delivers every pop it had accepted."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.request
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
from spop_cli.cli import EXIT_CONFIG
from spop_cli.hub.journal import Journal
from spop_cli.hub.journal_guard import APPLICATION_ID, JournalOpenError
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
        commit = journal.add(
            "hub-made", "telephone", "1", "", b"{}", time.time() + 60, remember=False
        )
        journal.done("hub-made")  # acked in the same loop iteration, before the writer ran
        await asyncio.wait_for(commit, 5)
        kept = journal.add(
            "source-id", "telephone", "1", "", b"{}", time.time() + 60, remember=True
        )
        journal.done("source-id")
        await asyncio.wait_for(kept, 5)
        await journal.close()

    run(body())
    rows = (
        sqlite3.connect(tmp_path / "j.sqlite3")
        .execute("SELECT id, done, body FROM pops")
        .fetchall()
    )
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


# -- contacts across a crash (issue 10, section 2) -------------------------------------------------

T = "2026-03-02T09:00:{:02d}Z"  # event times, one a second: wait_time is exact


def contacts_post(hub: Any, events: Any) -> tuple[int, Any]:
    return http_post(f"{hub.http}/v1/contacts", events)


def test_a_batch_resent_after_a_sigkill_is_a_duplicate_inside_the_window_only(
    tmp_path: Path,
) -> None:
    """A source that lost the answer in the crash resends the batch with the same ids: it is
    answered as applied (it was 422 contact_ended: the ids were in memory only), until the
    duplicate window has passed since the events were applied, as without a restart."""
    window = 3.0
    hub = HubProcess(tmp_path, "--dedupe-window", str(window)).start()
    try:
        batch = [
            {"id": "e1", "contact_id": "c", "event": "queued", "at": T.format(0)},
            {"id": "e2", "contact_id": "c", "event": "routed", "at": T.format(10), "resource": "1001"},
            {"id": "e3", "contact_id": "c", "event": "ended", "at": T.format(59)},
        ]  # fmt: skip
        status, first = contacts_post(hub, batch)
        applied_at = time.monotonic()
        assert status == 200 and first["applied"] == 3
        hub.restart()  # SIGKILL right after the 200
        assert time.monotonic() - applied_at < window - 1  # still inside the window
        assert contacts_post(hub, batch) == (200, {"applied": 3, "pops": []})  # as without a crash
        with urllib.request.urlopen(f"{hub.http}/v1/status", timeout=10) as answer:
            assert json.loads(answer.read())["counters"]["duplicate_events"] == 3
        time.sleep(max(0.0, applied_at + window + 0.2 - time.monotonic()))
        status, answer = contacts_post(hub, batch)  # outside it: new, and the contact is over
        assert (status, answer["error"], answer["index"]) == (422, "contact_ended", 0)
    finally:
        hub.stop()


def test_contacts_survive_a_sigkill_whole(tmp_path: Path) -> None:
    """Live contacts are journalled with their whole state: after kill -9 and a restart, the next
    answered/transferred/ended is applied as if nothing happened (it was 422 unknown_contact)."""
    hub = HubProcess(tmp_path).start()
    try:
        queued = {
            "contact_id": "c1",
            "event": "queued",
            "at": T.format(0),
            "source": "0612345678",
            "queue_name": "Ventes",
            "contact_data": {"dossier": "A-17"},
        }
        routed = {"contact_id": "c1", "event": "routed", "at": T.format(30), "resource": "1001"}
        assert contacts_post(hub, [queued, routed])[0] == 200
        assert (
            contacts_post(hub, {"contact_id": "c2", "event": "queued", "at": T.format(1)})[0] == 200
        )
        hub.restart()  # SIGKILL right after the 200s

        answered = {"contact_id": "c1", "event": "answered", "at": T.format(40), "resource": "1001"}
        assert contacts_post(hub, answered) == (200, {"applied": 1, "pops": []})
        transferred = {
            "contact_id": "c1",
            "event": "transferred",
            "at": T.format(50),
            "resource": "1002",
        }
        status, answer = contacts_post(hub, transferred)
        assert status == 200 and len(answer["pops"]) == 1

        async def check() -> None:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            await raw.request("register", media="telephone", resource="1002")
            got = (await raw.frame())["pop"]
            # the restored state: queue fields, data, the first answer's time, who held it
            assert (got["source"], got["queue_name"], got["contact_data"]) == (
                "0612345678",
                "Ventes",
                {"dossier": "A-17"},
            )
            assert (got["wait_time"], got["from"]) == (40, "1001")
            raw.close()

        run(check())
        # c2 still waits in its queue: routed now counts its wait from 09:00:01
        status, answer = contacts_post(
            hub, {"contact_id": "c2", "event": "routed", "at": T.format(21), "resource": "1003"}
        )
        assert status == 200 and len(answer["pops"]) == 1
        assert (
            contacts_post(hub, {"contact_id": "c2", "event": "ended", "at": T.format(22)})[0] == 200
        )
        hub.restart()
        # an ended contact stays ended across a restart (within forget_after)
        status, answer = contacts_post(
            hub, {"contact_id": "c2", "event": "answered", "at": T.format(23), "resource": "1003"}
        )
        assert (status, answer["error"]) == (422, "contact_ended")
    finally:
        hub.kill()


def test_an_ended_is_answered_only_once_its_withdrawal_is_committed(tmp_path: Path) -> None:
    """kill -9 right after the 200 of an `ended`: its withdrawn pop does not come back (it did,
    5 times out of 5, when the withdrawal rode the next batch)."""
    hub = HubProcess(tmp_path).start()
    try:
        for attempt in range(3):
            contact = f"gone-{attempt}"
            status, answer = contacts_post(
                hub, {"contact_id": contact, "event": "routed", "resource": "2001"}
            )
            assert status == 200 and len(answer["pops"]) == 1
            assert contacts_post(hub, {"contact_id": contact, "event": "ended"})[0] == 200
            assert rows(hub.journal)[answer["pops"][0]] == 1  # done on disk with the 200
            hub.restart()
            status = client.fetch_status(hub.address)
            assert (status["pending"], status["contacts"]) == (0, attempt + 1)
    finally:
        hub.kill()


def test_contact_expiry_removes_the_contact_from_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"

    def journalled() -> list[str]:
        with sqlite3.connect(path) as db:
            return [
                row[0] for row in db.execute("SELECT contact_id FROM contacts ORDER BY contact_id")
            ]

    async def body() -> None:
        options = {"journal": str(path), "contact_forget_after": 0.3, "contact_idle_expiry": 1.0}
        async with inprocess_hub(**options) as hub:
            await hub.apply_contacts(
                [
                    {"contact_id": "ends", "event": "queued"},
                    {"contact_id": "idles", "event": "queued"},
                    {"contact_id": "ends", "event": "ended"},
                ]
            )
            assert journalled() == ["ends", "idles"]  # committed with the 200
            assert await until(lambda: journalled() == ["idles"], 5)  # forget_after
            assert await until(lambda: journalled() == [], 5)  # idle_expiry
        async with inprocess_hub(journal=str(path)) as hub:
            assert hub.status()["contacts"] == 0

    run(body())


def test_a_refused_contact_commit_changes_nothing(tmp_path: Path) -> None:
    """The journal cannot commit: 503, the contact is as before, its pop never delivered."""
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        async with inprocess_hub(journal=str(path)) as hub:
            listener = await Counting().up(address_of(hub), "3001")
            await hub.apply_contacts({"contact_id": "k", "event": "queued", "at": T.format(0)})
            hub.journal._db.execute("PRAGMA busy_timeout = 50")
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            routed = {"contact_id": "k", "event": "routed", "at": T.format(5), "resource": "3001"}
            status, answer = await asyncio.to_thread(
                http_post, f"{http_of(hub)}/v1/contacts", routed
            )
            assert (status, answer["error"], answer["applied"]) == (503, "journal_unavailable", 0)
            fresh = {"contact_id": "new", "event": "queued"}
            status, _ = await asyncio.to_thread(http_post, f"{http_of(hub)}/v1/contacts", fresh)
            assert status == 503
            blocker.execute("ROLLBACK")
            blocker.close()
            later = {**routed, "at": T.format(9)}
            assert (await hub.apply_contacts(later))["applied"] == 1
            assert await until(lambda: len(listener.calls) == 1)
            answered = {"contact_id": "new", "event": "answered", "resource": "3001"}
            status, answer = await asyncio.to_thread(
                http_post, f"{http_of(hub)}/v1/contacts", answered
            )
            assert (status, answer["error"]) == (
                422,
                "unknown_contact",
            )  # its queued never happened
            await asyncio.sleep(0.3)
            assert len(listener.calls) == 1 and listener.twice() == []
            assert listener.sources == [""]
            await listener.listener.shutdown()

    run(body())


# -- a full disk and a shared journal (issue 10, section 3) ------------------------------------------

DISK_FULL = {
    "error": "journal_unavailable",
    "message": "the journal cannot be written (the disk is full): nothing was accepted; retry later",
}


class FullDisk:
    """A journal whose writes really fail with SQLITE_FULL, then get room again.

    `tmpfs`: the journal lives on a 4 MiB tmpfs mounted for the test, filled by a file (a real
    ENOSPC; needs root, skipped otherwise). `max_page_count`: SQLite's own size cap set to the
    pages the database has (a real SQLITE_FULL from SQLite, no mock; works anywhere)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.dir = tmp_path / "disk"
        self.dir.mkdir()
        self.filler = self.dir / "filler"
        if kind == "tmpfs":
            import subprocess

            mount = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(self.dir)],
                capture_output=True,
            )
            if mount.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
        self.journal = self.dir / "journal.sqlite3"

    def fill(self, hub: Any) -> None:
        if self.kind == "tmpfs":
            chunk = b"\0" * 65536
            with open(self.filler, "wb") as handle:
                try:
                    while True:
                        handle.write(chunk)
                        handle.flush()
                except OSError:
                    pass
        else:
            db = hub.journal._db
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {pages}")

    def free(self, hub: Any) -> None:
        if self.kind == "tmpfs":
            self.filler.unlink()
        else:
            hub.journal._db.execute("PRAGMA max_page_count = 1073741823")

    def close(self) -> None:
        if self.kind == "tmpfs":
            import subprocess

            subprocess.run(["umount", "-l", str(self.dir)], check=False)


def http_post_headers(url: str, body: Any) -> tuple[int, Any, dict[str, str]]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


BIG = {"big": "x" * 4000}  # a row over a page: it needs new pages, so the cap bites at once


@pytest.mark.parametrize(
    ("kind", "loop"),
    [("tmpfs", "asyncio"), ("max_page_count", "asyncio"), ("max_page_count", "uvloop")],
)
def test_a_full_disk_is_a_503_and_refused_pops_are_never_delivered(
    tmp_path: Path, kind: str, loop: str
) -> None:
    disk = FullDisk(kind, tmp_path)

    async def body() -> None:
        async with inprocess_hub(journal=str(disk.journal)) as hub:
            listener = await Counting().up(address_of(hub), "13579")
            disk.fill(hub)
            url = f"{http_of(hub)}/v1/pops"
            for attempt in range(2):  # a source retrying without id: refused again, not doubled
                status, answer, headers = await asyncio.to_thread(
                    http_post_headers, url, pop(source=f"refused-{attempt}", contact_data=BIG)
                )
                assert (status, answer, headers["Retry-After"]) == (503, DISK_FULL, "2")
            with pytest.raises(client.Rejected) as refused:
                await client.publish(address_of(hub), pop(source="refused-frame", contact_data=BIG))
            assert refused.value.detail == DISK_FULL
            routed = {
                "contact_id": "full",
                "event": "routed",
                "resource": "13579",
                "contact_data": BIG,
            }
            with pytest.raises(client.Rejected) as refused:
                await client.send_contacts(address_of(hub), [routed])
            assert refused.value.detail == {**DISK_FULL, "applied": 0, "pops": []}
            status, answer, headers = await asyncio.to_thread(
                http_post_headers, f"{http_of(hub)}/v1/contacts", routed
            )
            assert (status, answer["error"], headers["Retry-After"]) == (
                503,
                "journal_unavailable",
                "2",
            )
            disk.free(hub)  # room again: the next commit goes through, nothing to restart
            status, answer, _ = await asyncio.to_thread(http_post_headers, url, pop(source="after"))
            assert status == 200
            assert await until(lambda: listener.sources == ["after"], 5)
            await asyncio.sleep(0.3)
            assert listener.sources == ["after"]  # no refused pop, before or after
            assert hub.status()["counters"]["journal_refused"] == 5
            await listener.listener.shutdown()

    try:
        if loop == "uvloop":  # as `spop serve` runs
            uvloop = pytest.importorskip("uvloop")
            uvloop.run(asyncio.wait_for(body(), 60))
        else:
            run(body())
    finally:
        disk.close()


def test_a_second_hub_on_the_same_journal_refuses_to_start(tmp_path: Path) -> None:
    first = HubProcess(tmp_path / "first").start()
    second = HubProcess(tmp_path / "second")
    second.journal = first.journal
    try:
        with pytest.raises(RuntimeError) as refused:
            second.start()
        assert (
            f"spop: error: hub.journal: cannot open the journal {first.journal}: it is in use by"
            f" another hub (pid {first.pid}; lock file {first.journal}.lock): two hubs on one"
            " journal would deliver the same pops twice\n"
        ) in str(refused.value)
        assert second.proc is not None and second.proc.returncode == EXIT_CONFIG
        assert client.fetch_status(first.address)["pid"] == first.pid  # the first one runs on
        first.stop()
        second.start()  # the lock goes with the first hub
    finally:
        first.kill()
        second.kill()


def test_a_damaged_write_ahead_log_is_reported_at_start(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path).start()
    try:
        for i in range(6):  # six commits, each in its own frames of the log
            client_publish(hub.address, pop(id=f"w{i}", contact_data={"k": "v" * 3000}))
        hub.kill()
        wal = Path(f"{hub.journal}-wal")
        data = bytearray(wal.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the log
        wal.write_bytes(bytes(data))
        hub.start()
        output = hub.output()
        assert "spop: warning: journal " in output and "the write-ahead log is damaged" in output
        status = client.fetch_status(hub.address)
        assert status["pending"] < 6  # what SQLite dropped, now said out loud
    finally:
        hub.kill()


def test_rows_gone_since_a_clean_stop_are_reported_at_start(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path).start()
    try:
        client_publish(hub.address, [pop(id="a"), pop(id="b")])
        hub.stop()
        with sqlite3.connect(hub.journal) as db:
            db.execute("DELETE FROM pops WHERE id = 'a'")
        hub.start()
        assert (
            "2 pop rows and 0 contacts at the last clean stop, 1 and 0 now: the file was changed"
            " or damaged while the hub was down"
        ) in hub.output()
        hub.stop()
        hub.start()  # a clean stop and start: nothing to say
        # (this machine's hard open-file limit may be under max_connections: that warning is not
        # the journal's)
        journal_warnings = [
            line
            for line in hub.output().splitlines()
            if line.startswith("spop: warning") and "open-file limit" not in line
        ]
        assert journal_warnings == []
    finally:
        hub.kill()


def test_another_programs_sqlite_file_is_refused_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    stamped = tmp_path / "other.db"
    with sqlite3.connect(stamped) as db:
        db.execute("PRAGMA application_id = 42")
        db.execute("CREATE TABLE pops (x)")
    before = foreign.read_bytes(), stamped.read_bytes()
    with pytest.raises(JournalOpenError) as refused:
        Journal(foreign).open()
    assert str(refused.value) == (
        f"cannot open the journal {foreign}: it is a SQLite database of another program"
        " (tables: notes); left untouched: give --journal a path of its own"
    )
    with pytest.raises(JournalOpenError, match=r"application_id 0x2a, spop's is 0x53504f50"):
        Journal(stamped).open()
    assert (foreign.read_bytes(), stamped.read_bytes()) == before  # not even switched to WAL
    assert not Path(f"{foreign}-wal").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "other.db"]  # no lock left
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("hello, not a database, but long enough to be read as one" * 20)
    with pytest.raises(JournalOpenError, match="it is not an spop journal .file is not a database"):
        Journal(not_sqlite).open()


def test_a_journal_of_the_previous_version_opens_and_is_stamped(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    with sqlite3.connect(path) as db:  # the schema spop wrote before application_id
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(
            "CREATE TABLE pops (id TEXT PRIMARY KEY, media TEXT NOT NULL, resource TEXT NOT NULL,"
            " contact_id TEXT NOT NULL, body BLOB NOT NULL, accepted REAL NOT NULL,"
            " expires REAL NOT NULL, done INTEGER NOT NULL DEFAULT 0);"
            "CREATE INDEX pops_done ON pops(done, accepted);"
        )
        db.execute(
            "INSERT INTO pops VALUES ('old', 'telephone', '1', '', x'7b7d', ?, ?, 0)",
            (time.time(), time.time() + 60),
        )
    found, _ = reopen(path)
    assert [row.id for row in found] == ["old"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


def test_a_journal_with_the_old_done_index_loses_the_index_and_keeps_every_row(
    tmp_path: Path,
) -> None:
    """Journals written before had an index on (done, accepted) that no query needs; opening one
    drops it, keeps its rows and their order, and the file still takes new rows and dones."""
    path = tmp_path / "journal.sqlite3"
    now = time.time()
    with sqlite3.connect(path) as db:  # what spop wrote until this version, application_id included
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.executescript(
            "CREATE TABLE pops (id TEXT PRIMARY KEY, media TEXT NOT NULL, resource TEXT NOT NULL,"
            " contact_id TEXT NOT NULL, body BLOB NOT NULL, accepted REAL NOT NULL,"
            " expires REAL NOT NULL, done INTEGER NOT NULL DEFAULT 0);"
            "CREATE INDEX pops_done ON pops(done, accepted);"
            "CREATE TABLE contacts (contact_id TEXT PRIMARY KEY, state BLOB NOT NULL);"
        )
        db.executemany(
            "INSERT INTO pops VALUES (?, 'telephone', '1', 'c', x'7b7d', ?, ?, ?)",
            [
                ("z-pending", now, now + 60, 0),
                ("a-done", now, now + 60, 1),
                ("m-expired", now, now - 1, 0),
            ],
        )

    def indexes() -> list[str]:
        with sqlite3.connect(path) as db:
            return [
                r[0]
                for r in db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                )
            ]

    assert indexes() == ["pops_done"]
    journal = Journal(path, retain=60)
    found = journal.open()
    assert [(row.id, row.done) for row in found] == [
        ("z-pending", False),
        ("a-done", True),
        ("m-expired", True),
    ]
    assert journal.expired_while_down == [("m-expired", "telephone", "1")]
    assert indexes() == []

    async def more() -> None:
        journal.start()
        commit = journal.add("new", "telephone", "1", "", b"{}", time.time() + 60)
        journal.done("z-pending")
        await commit
        await journal.close()

    run(more())
    assert rows(path) == {"z-pending": 1, "a-done": 1, "m-expired": 1, "new": 0}
    found, _ = reopen(path)
    assert [(row.id, row.done) for row in found] == [
        ("z-pending", True),
        ("a-done", True),
        ("m-expired", True),
        ("new", False),
    ]
    with sqlite3.connect(path) as db:  # a hub of the previous version builds its index again
        db.execute("CREATE INDEX IF NOT EXISTS pops_done ON pops(done, accepted)")
        assert db.execute("SELECT id FROM pops WHERE done = 0").fetchall() == [("new",)]
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def crash_image(tmp_path: Path, commits: int) -> tuple[Path, int]:
    """A database and its write-ahead log as a crash leaves them: `commits` transactions of one
    4 KiB-page row each, copied while the writer still holds them (never checkpointed)."""
    import shutil

    live = tmp_path / "live.sqlite3"
    db = sqlite3.connect(live, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (x BLOB)")
    for _ in range(commits):
        db.execute("INSERT INTO t VALUES (zeroblob(3000))")
    image = tmp_path / "image.sqlite3"
    shutil.copy(live, image)
    shutil.copy(f"{live}-wal", f"{image}-wal")
    page = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return image, page


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("none", ""),
        (
            "checksum",
            "the write-ahead log is damaged: its frames 4 to 13 (of 13) are dropped, with 3 committed transaction(s): pops and contact changes accepted in them are gone",
        ),
        (
            "salt",
            "the write-ahead log is damaged: its frames 4 to 13 (of 13) are dropped, with 3 committed transaction(s): pops and contact changes accepted in them are gone",
        ),
        (
            "torn tail",
            "the write-ahead log has 1 damaged frame(s) after frame 13, none ending a transaction (a write cut short, e.g. by a power loss): probably nothing committed is lost",
        ),
        ("header", "has a damaged header: SQLite will ignore every frame in it"),
    ],
)
def test_the_write_ahead_log_check_says_what_sqlite_drops(
    tmp_path: Path, damage: str, expected: str
) -> None:
    from spop_cli.hub.journal_guard import scan_wal

    # 13 frames, 5 commits (the table, then 4 rows), ending at frames 2, 3, 7, 10 and 13
    image, page = crash_image(tmp_path, 4)
    wal = Path(f"{image}-wal")
    data = bytearray(wal.read_bytes())
    frame = 24 + page
    frames = (len(data) - 32) // frame
    sixth = 32 + 5 * frame  # the sixth frame: its transaction and the two after it are lost
    if damage == "checksum":
        data[sixth + 24 + 100] ^= 0xFF
    elif damage == "salt":
        data[sixth + 8] ^= 0xFF
    elif damage == "torn tail":
        data += data[32 : 32 + frame]  # a frame of the current log, no commit, bad checksum
        data[-1] ^= 0xFF
    elif damage == "header":
        data[20] ^= 0xFF
    wal.write_bytes(bytes(data))
    problem = scan_wal(image).problem()
    assert frames == 13
    if damage == "header":
        assert problem.endswith(expected)
    else:
        assert problem == expected


def test_the_writer_checkpoints_so_the_log_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's autocheckpoint is off (it could fsync on the event loop). Checkpoints run every
    CHECKPOINT_ROWS rows beside the commits; under a stream with no pause they never reach the
    log's end, so past WAL_LIMIT_FRAMES the writer checkpoints once and the log is reused."""
    monkeypatch.setattr("spop_cli.hub.journal.CHECKPOINT_ROWS", 1000)
    monkeypatch.setattr("spop_cli.hub.journal.WAL_LIMIT_FRAMES", 256)
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        journal = Journal(path)
        journal.open()
        journal.start()
        body_1k = b"x" * 1000
        for start in range(0, 8000, 500):  # 8 MB of rows in 16 batches
            await asyncio.gather(
                *(
                    journal.add(f"p{i}", "telephone", "1", "", body_1k, time.time() + 60)
                    for i in range(start, start + 500)
                )
            )
        size = Path(f"{path}-wal").stat().st_size
        await journal.close()
        # 8 MB of rows: an unbounded log holds them all (11.7 MB measured); bounded, it holds
        # the limit and what came between two checkpoints (3-4.5 MB measured)
        assert size < 6_000_000, size

    run(body())


def test_an_event_id_refused_by_a_full_disk_applies_when_sent_again(tmp_path: Path) -> None:
    """The refused commit undid the event, so its id must not stay a duplicate: a resend pops."""
    disk = FullDisk("max_page_count", tmp_path)

    async def body() -> None:
        async with inprocess_hub(journal=str(disk.journal)) as hub:
            listener = await Counting().up(address_of(hub), "13579")
            routed = {
                "id": "evt-1",
                "contact_id": "full-id",
                "event": "routed",
                "resource": "13579",
                "source": "retried",
                "contact_data": BIG,
            }
            url = f"{http_of(hub)}/v1/contacts"
            disk.fill(hub)
            status, answer, _ = await asyncio.to_thread(http_post_headers, url, routed)
            assert (status, answer["error"]) == (503, "journal_unavailable")
            disk.free(hub)
            status, answer, _ = await asyncio.to_thread(http_post_headers, url, routed)
            assert (status, answer["applied"], answer["pops"]) == (200, 1, ["evt-1"])
            assert await until(lambda: listener.sources == ["retried"], 5)
            status, answer, _ = await asyncio.to_thread(http_post_headers, url, routed)
            assert (status, answer["applied"], answer["pops"]) == (200, 1, [])  # now a duplicate
            assert hub.status()["counters"]["duplicate_events"] == 1
            await listener.listener.shutdown()

    run(body())
