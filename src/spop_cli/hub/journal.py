"""The SQLite journal (WAL): accepted, undelivered pops survive a crash. Commits in batches."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
CREATE INDEX IF NOT EXISTS pops_done ON pops(done, accepted);
"""
# A row goes once it is past the duplicate window AND no longer owed (handled or expired): a pop
# still pending outlives the window when pop_ttl is longer than dedupe_window.
PURGE = "DELETE FROM pops WHERE accepted < ? AND (done = 1 OR expires < ?)"


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
    """Adds are committed before their future resolves; acks/withdrawals ride the next batch."""

    def __init__(self, path: str | Path, retain: float = 120.0) -> None:
        self.path = Path(path)
        self.retain = retain  # how long done rows stay, for the duplicate window across restarts
        self._db: sqlite3.Connection | None = None
        self._adds: list[tuple[Any, ...] | None] = []
        self._batch: asyncio.Future[None] | None = None  # the commit every queued add waits for
        # Rows queued but not yet taken by the writer, by id → (index in _adds, remember).
        # A pop acknowledged before its batch is written needs no durability: its row is dropped,
        # or written already done when its id must stay a duplicate across a restart.
        self._queued: dict[str, tuple[int, bool]] = {}
        self.skipped = 0  # rows never written because their pop was handled first
        self._retry: list[tuple[Any, ...]] = []
        self.expired_while_down: list[tuple[str, str, str]] = []  # rows of a failed batch, tried again first
        self._dones: list[tuple[str]] = []
        # The batch being written: its rows' ids (queued and retried) and its commit.
        self._inflight: tuple[Container[str], Container[str], asyncio.Future[None] | None] = (
            (),
            (),
            None,
        )
        self._retry_ids: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0
        self.rows_committed = 0

    def open(self) -> list[JournalRow]:
        """Open (creating it) and return the rows within the retention window."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against process death
        db.executescript(SCHEMA)
        now = time.time()
        # pops that expired undelivered while the hub was down: counted and named, not silent
        self.expired_while_down = [
            (row[0], row[1], row[2])
            for row in db.execute(
                "SELECT id, media, resource FROM pops WHERE done = 0 AND expires < ?", (now,)
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
        self._db = db
        return rows

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._writer())
        self._task.add_done_callback(_report_end)

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
        batch = self._batch
        if batch is None:
            batch = self._batch = asyncio.get_running_loop().create_future()
            assert self._wake is not None
            self._wake.set()
        self._queued[pop_id] = (len(self._adds), remember)
        self._adds.append((pop_id, media, resource, contact_id, body, time.time(), expires, 0))
        return batch

    def commit_of(self, pop_id: str) -> asyncio.Future[None] | None:
        """The commit of a pop added but not yet committed, else None (committed or unknown)."""
        if pop_id in self._queued or pop_id in self._retry_ids:
            return self._batch
        queued, retried, inflight = self._inflight
        if inflight is not None and (pop_id in queued or pop_id in retried):
            return inflight
        return None

    def done(self, pop_id: str) -> None:
        """The pop was acknowledged, withdrawn or expired."""
        queued = self._queued.pop(pop_id, None)
        if queued is not None:
            index, remember = queued
            row = self._adds[index]
            # a handled pop's row only keeps its id a duplicate: no body to write
            self._adds[index] = (*row[:4], b"", *row[5:7], 1) if remember and row is not None else None
            self.skipped += not remember
            return
        self._dones.append((pop_id,))
        if len(self._dones) > 512 and self._wake is not None:
            self._wake.set()

    async def _writer(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        last_purge = time.monotonic()
        while True:
            if not self._closing:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=0.2)
                except TimeoutError:
                    pass
            self._wake.clear()
            adds = self._retry + [row for row in self._adds if row is not None]
            batch, self._batch = self._batch, None
            self._inflight = (self._queued, self._retry_ids, batch)
            self._retry, self._retry_ids = [], set()
            self._adds, self._queued = [], {}
            dones, self._dones = self._dones, []
            purge = time.monotonic() - last_purge > 5.0
            if purge:
                last_purge = time.monotonic()
            error: Exception | None = None
            if adds or dones or purge:
                try:
                    await loop.run_in_executor(None, self._commit, adds, dones, purge)
                except Exception as exc:  # disk full, locked: the sources get an error, not a 2xx
                    error = exc
            # Resolved even when every row of the batch was dropped (all handled before the
            # write): its sources wait on it.
            if batch is not None and not batch.done():
                if error is None:
                    batch.set_result(None)
                else:
                    batch.set_exception(error)
                    batch.exception()  # retrieved: those who wait get it; none is no leak
            self._inflight = ((), (), None)
            if error is not None and adds:
                self._requeue(adds)
            if self._closing and (error is not None or (not self._adds and not self._dones)):
                return

    def _requeue(self, rows: list[tuple[Any, ...]]) -> None:
        """A failed batch's rows go first into the next one; a source resending one of them
        waits for that commit (`commit_of`), never gets an `ok` for a row not written."""
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
        self._retry = rows
        self._retry_ids = {row[0] for row in rows}

    def _commit(self, adds: list[tuple[Any, ...]], dones: list[tuple[str]], purge: bool) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN")
        try:
            if adds:
                db.executemany("INSERT OR IGNORE INTO pops VALUES (?, ?, ?, ?, ?, ?, ?, ?)", adds)
            if dones:
                db.executemany("UPDATE pops SET done = 1 WHERE id = ?", dones)
            if purge:
                now = time.time()
                db.execute(PURGE, (now - self.retain, now))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")  # else every later BEGIN fails: one bad batch, no journal
            raise
        self.commits += 1
        self.rows_committed += len(adds)

    async def close(self) -> None:
        """Commit what is queued, then close the database."""
        if self._task is not None:
            self._closing = True
            assert self._wake is not None
            self._wake.set()
            await self._task
            self._task = None
        if self._db is not None:
            self._db.close()
            self._db = None


def _report_end(task: asyncio.Task[None]) -> None:
    """A writer that dies would leave every source waiting: say so loudly."""
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger("spop.hub").error("journal writer died", exc_info=task.exception())
