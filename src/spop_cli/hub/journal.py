"""The SQLite journal (WAL): accepted, undelivered pops and live contacts survive a crash.
Commits in batches (group commit)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..pops import InputError
from .journal_guard import (
    APPLICATION_ID,
    JournalLock,
    JournalOpenError,
    check_ours,
    quick_check,
    scan_wal,
)

log = logging.getLogger("spop.hub")

SCHEMA = """
CREATE TABLE IF NOT EXISTS pops (
    id TEXT PRIMARY KEY,
    media TEXT NOT NULL,
    resource TEXT NOT NULL,
    contact_id TEXT NOT NULL,
    body BLOB NOT NULL,
    accepted REAL NOT NULL,
    expires REAL NOT NULL,
    done INTEGER NOT NULL DEFAULT 0
);
DROP INDEX IF EXISTS pops_done;
CREATE TABLE IF NOT EXISTS contacts (
    contact_id TEXT PRIMARY KEY,
    state BLOB NOT NULL
);
"""
# No index beside the primary key: the purge below scans the table whatever the index (its OR
# defeats one), and only the start-up reads filter on `done`. The index `pops_done` that journals
# written before had cost every pop three more B-tree changes (insert, done, delete), a quarter of
# SQLite's work per pop (benchmarks/PROFILE.md); opening such a journal drops it. A hub of an
# earlier version opening the file again simply builds it anew.
# A row goes once it is past the duplicate window AND no longer owed (handled or expired): a pop
# still pending outlives the window when pop_ttl is longer than dedupe_window.
PURGE = "DELETE FROM pops WHERE accepted < ? AND (done = 1 OR expires < ?)"
# A contact's state, changed at each of its events: updated in place (not INSERT OR REPLACE,
# which deletes the row and its key and inserts both again: a third more of SQLite's work per row).
UPSERT_CONTACT = "INSERT INTO contacts VALUES (?, ?) ON CONFLICT(contact_id) DO UPDATE SET state = excluded.state"
INSERT_POP = "INSERT OR IGNORE INTO pops VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
# BLOBs are queued as bytearrays: sqlite3 binds one as it is, where a `bytes` goes through its
# adapter lookup first (a failed `__conform__` lookup, formatted AttributeError and all): 1,800
# instructions a row under callgrind. The stored value is the same BLOB.
NO_BODY = bytearray()  # a handled pop's row keeps only its id; never changed
RETRY_AFTER = 2  # seconds a source is told to wait when the journal cannot be written
SQLITE_FULL = 13
# A batch this small commits on the event loop: a WAL commit without fsync takes tens of
# microseconds, less than the thread hops it would cost every pop (measured: a tenth of the hub's
# CPU per single-pop POST). Bigger batches run in the journal's thread, and what may fsync or scan
# (checkpoints, the purge) never runs inside a commit (see _writer).
INLINE_ROWS = 64
TICK = 0.2  # seconds at most before queued dones and contact states are committed
PURGE_EVERY = 5.0  # seconds between purges of rows past the duplicate window
CHECKPOINT_ROWS = 4000  # rows written between checkpoints (SQLite's own autocheckpoint is off)
# Checkpoints run beside the commits, so under a steady stream one rarely catches the log's end
# and the log cannot be reused: past this many frames (16 MB of 4 KiB pages) the writer itself
# checkpoints once between two batches, and the log starts over.
WAL_LIMIT_FRAMES = 4096


class JournalUnavailable(InputError):
    """A commit failed (disk full, database locked, I/O error): nothing of the batch is accepted.
    HTTP 503 with Retry-After; an `error` frame with the same `journal_unavailable` detail."""

    def __init__(self, cause: BaseException) -> None:
        full = getattr(cause, "sqlite_errorcode", None) == SQLITE_FULL or (
            isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        )
        why = "the disk is full" if full else str(cause)
        # a cause may say itself what the source should do (NatsUnavailable: the write may be
        # stored after all, or nothing was sent)
        answer = getattr(cause, "answer", None) or (
            f"the journal cannot be written ({why}): nothing was accepted; retry later"
        )
        super().__init__(503, "journal_unavailable", answer)
        self.disk_full = full
        self.retry_after = RETRY_AFTER


@dataclass(slots=True)
class JournalRow:
    id: str
    media: str
    resource: str
    contact_id: str
    body: bytes
    accepted: float
    expires: float
    done: bool


class Journal:
    """Adds, contact states and the dones queued with them are committed together; the future of
    their batch resolves on the commit (or fails with JournalUnavailable)."""

    def __init__(self, path: str | Path, retain: float = 120.0) -> None:
        self.path = Path(path)
        self.retain = retain  # how long done rows stay, for the duplicate window across restarts
        self._db: sqlite3.Connection | None = None
        self._cursor: sqlite3.Cursor | None = None  # the commits' (made at the first)
        self._lock = JournalLock(self.path)
        self._adds: list[tuple[Any, ...] | None] = []
        self._batch: asyncio.Future[None] | None = None  # the commit every queued change waits for
        # Rows queued but not yet taken by the writer, by id → (index in _adds, remember).
        # A pop withdrawn before its batch is written needs no durability: its row is dropped,
        # or written already done when its id must stay a duplicate across a restart.
        self._queued: dict[str, tuple[int, bool]] = {}
        self.skipped = 0  # rows never written because their pop was handled first
        self.expired_while_down: list[tuple[str, str, str]] = []
        self.contacts: list[tuple[str, bytes]] = []  # contact states found at open
        self.warnings: list[str] = []  # what open found wrong (damaged log, lost rows), for the log
        self._dones: list[tuple[str]] = []
        self._states: dict[str, bytearray | None] = {}  # contact id → its state, None: forget it
        self._wake: asyncio.Event | None = None
        self._idle = False  # the writer's task waits for work: `_kick` may commit on its own
        self._kicked = False  # a `_kick` is on its way
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._last_purge = time.monotonic()
        self._closing = False
        self.commits = 0
        self.rows_committed = 0
        self.failures = 0  # failed commits since the last good one
        self._since_checkpoint = 0  # rows written since the last checkpoint
        self._thread: ThreadPoolExecutor | None = (
            None  # bigger commits, the purge, the writer's checkpoint
        )
        self._checkpointer: ThreadPoolExecutor | None = None  # where checkpoints run
        self._checkpointing: asyncio.Future[None] | None = None
        self._checkpoint_db: sqlite3.Connection | None = None
        self._wal_frames = 0  # frames in the log at the last checkpoint

    def open(self) -> list[JournalRow]:
        """Lock, check the file is ours, open (creating it); return the rows within the window.

        Raises JournalOpenError (another hub holds it, another program's file) before changing
        anything in the file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            return self._open()
        except BaseException as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            # another program's file: leave no lock file of ours beside it
            self._lock.release(remove=isinstance(exc, JournalOpenError) and not self._lock.previous)
            raise

    def _open(self) -> list[JournalRow]:
        wal = scan_wal(self.path)  # before SQLite replays (and silently truncates) the log
        db = self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        stamped = check_ours(db, self.path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process death
        db.execute("PRAGMA wal_autocheckpoint=0")  # the writer checkpoints, off the event loop
        db.executescript(SCHEMA)
        if not stamped:  # new, or written by spop before application_id: ours from now on
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self._check(db, wal.problem())
        now = time.time()
        # pops that expired undelivered while the hub was down: counted and named, not silent
        self.expired_while_down = [
            (row[0], row[1], row[2])
            for row in db.execute(
                # contact updates expire quietly (no listener may have asked for them)
                "SELECT id, media, resource FROM pops WHERE done = 0 AND expires < ?"
                ' AND CAST(substr(body, 1, 14) AS TEXT) != \'{"op":"change"\'',
                (now,),
            )
        ]
        db.execute("UPDATE pops SET done = 1 WHERE done = 0 AND expires < ?", (now,))
        db.execute(PURGE, (now - self.retain, now))
        rows = [
            JournalRow(*row[:7], bool(row[7]))
            for row in db.execute(
                "SELECT id, media, resource, contact_id, body, accepted, expires, done FROM pops ORDER BY rowid"
            )
        ]
        self.contacts = list(db.execute("SELECT contact_id, state FROM contacts ORDER BY rowid"))
        return rows

    def _check(self, db: sqlite3.Connection, wal_problem: str) -> None:
        """Say at start what can be known lost: a damaged log, rows missing since a clean stop."""
        if wal_problem:
            self.warnings.append(f"journal {self.path}: {wal_problem}")
        previous = self._lock.previous.split()
        if (
            previous[:1] == ["clean"]
            and len(previous) == 3
            and all(n.isdigit() for n in previous[1:])
        ):
            pops, contacts = int(previous[1]), int(previous[2])
            found = self._counts(db)
            if found == (pops, contacts):
                return
            self.warnings.append(
                f"journal {self.path}: {pops} pop rows and {contacts} contacts at the last clean"
                f" stop, {found[0]} and {found[1]} now: the file was changed or damaged"
                " while the hub was down"
            )
        if previous[:1] in (["running"], ["clean"]):
            # the last hub did not stop cleanly (crash, kill -9, power loss), or rows changed
            # since it did: check the pages
            damage = quick_check(db)
            if damage:
                self.warnings.append(
                    f"journal {self.path}: quick_check finds damage: {damage[:500]}"
                )

    @staticmethod
    def _counts(db: sqlite3.Connection) -> tuple[int, int]:
        pops = db.execute("SELECT count(*) FROM pops").fetchone()[0]
        contacts = db.execute("SELECT count(*) FROM contacts").fetchone()[0]
        return int(pops), int(contacts)

    def start(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="spop-journal")
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="spop-checkpoint")
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._writer())
        self._task.add_done_callback(_report_end)
        self._ticker = asyncio.get_running_loop().call_later(TICK, self._tick)

    def _tick(self) -> None:
        """Every TICK: wake the writer for dones and contact states queued without a pop (they
        do not wake it themselves) and for the purge. A timer of its own, not a timeout around
        every wait: that was a timer armed and cancelled per commit."""
        assert self._wake is not None
        self._ticker = asyncio.get_running_loop().call_later(TICK, self._tick)
        if self._dones or self._states or time.monotonic() - self._last_purge > PURGE_EVERY:
            self._wake.set()

    def barrier(self) -> asyncio.Future[None]:
        """The commit of the batch that holds everything queued so far (adds, dones, states)."""
        batch = self._batch
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._batch = loop.create_future()
            if not self._kicked:
                self._kicked = True
                loop.call_soon(self._kick)
        return batch

    def add(
        self,
        pop_id: str,
        media: str,
        resource: str,
        contact_id: str,
        body: bytes,
        expires: float,
        remember: bool = True,
    ) -> asyncio.Future[None]:
        """Queue a row; the returned future (shared by the whole batch) resolves on its commit.

        `remember`: the id came from the source, so it must stay a duplicate after a restart.
        """
        batch = self.barrier()
        self._queued[pop_id] = (len(self._adds), remember)
        row = (pop_id, media, resource, contact_id, bytearray(body), time.time(), expires, 0)
        self._adds.append(row)
        return batch

    def put_contact(self, contact_id: str, state: bytes) -> None:
        """Queue a contact's state for the next batch (the last state queued wins)."""
        self._states[contact_id] = bytearray(state)  # a BLOB bound as it is (BLOB above)

    def forget_contact(self, contact_id: str) -> None:
        """Queue the removal of a contact (expired, forgotten) for the next batch."""
        self._states[contact_id] = None
        if len(self._states) > 512 and self._wake is not None:
            self._wake.set()

    def done(self, pop_id: str) -> None:
        """The pop was acknowledged, withdrawn or expired."""
        queued = self._queued.pop(pop_id, None)
        if queued is not None:
            index, remember = queued
            row = self._adds[index]
            # a handled pop's row only keeps its id a duplicate: no body to write
            self._adds[index] = (
                (*row[:4], NO_BODY, *row[5:7], 1) if remember and row is not None else None
            )
            self.skipped += not remember
            return
        self._dones.append((pop_id,))
        if len(self._dones) > 512 and self._wake is not None:
            self._wake.set()

    def _kick(self) -> None:
        """A batch was opened this turn of the loop (by `barrier`), called once what else this
        turn queues has joined it. A small batch, with no purge due, is committed here at once:
        no wake-up of the writer's task, no turn of the loop of its own per commit (PROFILE.md,
        "Hub per-request cuts"). Anything else is the writer's: a big batch (its thread), the
        purge and the writer's checkpoint, a commit while the writer is busy with another."""
        self._kicked = False
        assert self._wake is not None
        if (
            self._idle
            and not self._closing
            and len(self._adds) + len(self._dones) + len(self._states) <= INLINE_ROWS
            and self._wal_frames <= WAL_LIMIT_FRAMES
            and time.monotonic() - self._last_purge <= PURGE_EVERY
        ):
            adds, dones, states, batch, rows, checkpoint = self._take()
            self._settle(batch, self._write(adds, dones, states) if rows else None)
            if checkpoint:
                self._start_checkpoint()
        else:
            self._wake.set()

    def _take(
        self,
    ) -> tuple[
        list[tuple[Any, ...]],
        list[tuple[str]],
        dict[str, bytearray | None],
        asyncio.Future[None] | None,
        int,
        bool,
    ]:
        """Everything queued, as one batch: adds, dones, states, its future, its rows, and
        whether a checkpoint is due after it."""
        adds = [row for row in self._adds if row is not None]
        batch, self._batch = self._batch, None
        self._adds, self._queued = [], {}
        dones, self._dones = self._dones, []
        states, self._states = self._states, {}
        rows = len(adds) + len(dones) + len(states)
        self._since_checkpoint += rows
        checkpoint = self._since_checkpoint >= CHECKPOINT_ROWS
        if checkpoint:
            self._since_checkpoint = 0
        return adds, dones, states, batch, rows, checkpoint

    def _write(
        self,
        adds: list[tuple[Any, ...]],
        dones: list[tuple[str]],
        states: dict[str, bytearray | None],
    ) -> JournalUnavailable | None:
        """Commit a batch on the loop; the error its sources get, or None."""
        try:
            self._commit(adds, dones, states)
        except Exception as exc:  # disk full, locked: the sources get a 503, not a 2xx
            return self._refused(exc, adds, states)
        self._written()
        return None

    def _refused(
        self, exc: Exception, adds: list[tuple[Any, ...]], states: dict[str, bytearray | None]
    ) -> JournalUnavailable:
        error = exc if isinstance(exc, JournalUnavailable) else JournalUnavailable(exc)
        error.__cause__ = exc
        self._failed(exc, len(adds), len(states))
        return error

    def _written(self) -> None:
        if self.failures:
            log.warning(
                "journal %s writable again after %d failed commits", self.path, self.failures
            )
        self.failures = 0

    @staticmethod
    def _settle(batch: asyncio.Future[None] | None, error: JournalUnavailable | None) -> None:
        # Resolved even when every row of the batch was dropped (all handled before the
        # write): its sources wait on it.
        if batch is not None and not batch.done():
            if error is None:
                batch.set_result(None)
            else:
                batch.set_exception(error)
                batch.exception()  # retrieved: those who wait get it; none is no leak

    def _start_checkpoint(self) -> None:
        if self._checkpointing is None or self._checkpointing.done():
            self._checkpointing = asyncio.get_running_loop().run_in_executor(
                self._checkpointer, self._checkpoint
            )

    async def _writer(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._closing and not self._wake.is_set():
                self._idle = True  # `_kick` may commit small batches meanwhile
                try:
                    await self._wake.wait()  # a big batch, a backlog of dones, `_tick`, close
                finally:
                    self._idle = False
            self._wake.clear()
            purge = time.monotonic() - self._last_purge > PURGE_EVERY
            if purge:
                self._last_purge = time.monotonic()
            adds, dones, states, batch, rows, checkpoint = self._take()
            if purge and not checkpoint:
                self._since_checkpoint = 0
                checkpoint = True
            error: JournalUnavailable | None = None
            if rows:
                if rows <= INLINE_ROWS:
                    error = self._write(adds, dones, states)
                else:
                    try:
                        await loop.run_in_executor(self._thread, self._commit, adds, dones, states)
                    except Exception as exc:
                        error = self._refused(exc, adds, states)
                    else:
                        self._written()
            self._settle(batch, error)
            # the batch is answered: the upkeep waits for nothing of it
            if purge:
                await loop.run_in_executor(self._thread, self._purge)
            if self._wal_frames > WAL_LIMIT_FRAMES:
                self._wal_frames = 0
                await loop.run_in_executor(self._thread, self._checkpoint, True)
            elif checkpoint:
                self._start_checkpoint()
            if self._closing and (
                error is not None or not (self._adds or self._dones or self._states)
            ):
                return

    def _failed(self, exc: Exception, adds: int, states: int) -> None:
        """One line per outage, then one every 100 failed commits: a full disk must not flood the log."""
        if self.failures % 100 == 0:
            log.error(
                "journal %s cannot be written (%s): %d pops and %d contact changes refused (%d failed commits so far)",
                self.path,
                exc,
                adds,
                states,
                self.failures + 1,
            )
        self.failures += 1

    def _commit(
        self,
        adds: list[tuple[Any, ...]],
        dones: list[tuple[str]],
        states: dict[str, bytearray | None],
    ) -> None:
        db = self._db
        assert db is not None
        cursor = self._cursor  # one for every commit: `db.execute` makes a cursor per call
        if cursor is None:
            cursor = self._cursor = db.cursor()
        if len(adds) == 1 and not dones and not states:
            # one row (a source sending one pop at a time): one statement is its own
            # transaction, as durable, without a BEGIN and a COMMIT statement of their own
            cursor.execute(INSERT_POP, adds[0])
            self.commits += 1
            self.rows_committed += 1
            return
        cursor.execute("BEGIN")
        try:
            if adds:
                cursor.executemany(INSERT_POP, adds)
            if dones:
                cursor.executemany("UPDATE pops SET done = 1 WHERE id = ?", dones)
            if states:
                kept = [(cid, state) for cid, state in states.items() if state is not None]
                gone = [(cid,) for cid, state in states.items() if state is None]
                if kept:
                    cursor.executemany(UPSERT_CONTACT, kept)
                if gone:
                    cursor.executemany("DELETE FROM contacts WHERE contact_id = ?", gone)
            cursor.execute("COMMIT")
        except BaseException:
            # else every later BEGIN fails: one bad batch, no journal. SQLite may have rolled
            # back already (a full disk at COMMIT): then ROLLBACK would mask the real error.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        self.commits += 1
        self.rows_committed += len(adds)

    def _purge(self) -> None:
        """Rows past the duplicate window, in a transaction of their own (in the journal's thread,
        after the batch before it was answered: a scan of the table delays no pop of that batch)."""
        db = self._db
        assert db is not None
        now = time.time()
        try:
            db.execute(PURGE, (now - self.retain, now))
        except sqlite3.Error as exc:  # a full disk: the rows go at a later purge
            log.debug("journal purge failed: %s", exc)

    def _checkpoint(self, by_writer: bool = False) -> None:
        """Copy the log into the database so the log is reused. On a connection and a thread of
        its own, its fsync delays no commit (a PASSIVE checkpoint never blocks the writer); by
        the writer between two batches when the log has grown past WAL_LIMIT_FRAMES."""
        db = self._db if by_writer else self._checkpoint_db
        if db is None:
            db = self._checkpoint_db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None
            )
        try:
            _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # a full disk: the next checkpoint tries again
            log.debug("journal checkpoint failed: %s", exc)
            return
        if not by_writer:
            self._wal_frames = frames  # the log's length when it ran: the writer's cue

    async def close(self) -> None:
        """Commit what is queued, record the row counts of this clean stop, close, unlock."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._task is not None:
            self._closing = True
            assert self._wake is not None
            self._wake.set()
            await self._task
            self._task = None
        for pool in (self._thread, self._checkpointer):
            if pool is not None:
                pool.shutdown(wait=True)
        self._thread = self._checkpointer = None
        if self._checkpoint_db is not None:
            self._checkpoint_db.close()
            self._checkpoint_db = None
        if self._batch is not None and not self._batch.done():  # queued behind a failed commit
            self._batch.set_exception(JournalUnavailable(RuntimeError("the hub is stopping")))
            self._batch.exception()
            self._batch = None
        if self._db is not None:
            try:
                pops, contacts = self._counts(self._db)
                self._db.close()
                self._lock.write(f"clean {pops} {contacts}")
            finally:
                self._db = self._cursor = None
        self._lock.release()


def _report_end(task: asyncio.Task[None]) -> None:
    """A writer that dies would leave every source waiting: say so loudly."""
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger("spop.hub").error("journal writer died", exc_info=task.exception())
