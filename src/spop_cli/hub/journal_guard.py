"""What the journal checks before it trusts a file: one hub per journal (a lock held for the hub's
life), the file is ours (SQLite `application_id`), and what a damaged write-ahead log loses."""

from __future__ import annotations

import os
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# 'SPOP' in ASCII: SQLite's application_id for an spop journal (PRAGMA application_id).
APPLICATION_ID = 0x53504F50
# The tables a journal written before application_id existed may hold (spop 0.x).
LEGACY_POPS_COLUMNS = (
    "id",
    "media",
    "resource",
    "contact_id",
    "body",
    "accepted",
    "expires",
    "done",
)
WAL_MAGIC = (0x377F0682, 0x377F0683)
WAL_SCAN_LIMIT = 64 * 1024 * 1024  # ~1.6 s to check at start; larger logs are not (say so)


class JournalOpenError(Exception):
    """The journal cannot be used: in use by another hub, or not an spop journal. Names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot open the journal {path}: {reason}")
        self.path = path
        self.reason = reason


class JournalLock:
    """An exclusive lock on `<journal>.lock`, held while the hub runs. The file also records how
    the last hub stopped: `clean <rows>` after a graceful stop, `running <pid>` while one runs."""

    def __init__(self, journal: Path) -> None:
        self.path = journal.with_name(journal.name + ".lock")
        self._file: IO[str] | None = None
        self.previous = ""  # what the last hub wrote: how it stopped

    def acquire(self) -> None:
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the hub's life)
        try:
            _lock(handle)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            pid = holder.split()[1] if holder.startswith("running ") else "unknown"
            raise JournalOpenError(
                self._journal(),
                f"it is in use by another hub (pid {pid}; lock file {self.path}): two hubs on"
                " one journal would deliver the same pops twice",
            ) from None
        handle.seek(0)
        self.previous = handle.read().strip()
        self._file = handle
        self.write(f"running {os.getpid()}")

    def _journal(self) -> Path:
        return self.path.with_name(self.path.name.removesuffix(".lock"))

    def write(self, text: str) -> None:
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.write(text + "\n")
        self._file.flush()

    def release(self, remove: bool = False) -> None:
        """Drop the lock; `remove`: delete the lock file first (it was made for nothing)."""
        if self._file is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            self._file.close()  # closing drops the lock
            self._file = None


def _lock(handle: IO[str]) -> None:
    """Exclusive, non-blocking; raises OSError when another process (or handle) holds it."""
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def check_ours(db: sqlite3.Connection, path: Path) -> bool:
    """True when the file is stamped as an spop journal; False when it is empty (new) or a journal
    of spop before application_id: to be stamped. Raises JournalOpenError, changing nothing, for anything else."""
    try:
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = [
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
    except sqlite3.DatabaseError as exc:
        raise JournalOpenError(path, f"it is not an spop journal ({exc})") from None
    if app_id == APPLICATION_ID:
        return True
    if app_id != 0:
        raise JournalOpenError(
            path,
            f"it belongs to another program (SQLite application_id {app_id:#x}, spop's is"
            f" {APPLICATION_ID:#x}); left untouched: give --journal a path of its own",
        )
    if not tables:
        return False  # a new, empty database
    if tables == ["pops"]:
        columns = tuple(row[1] for row in db.execute("PRAGMA table_info(pops)"))
        if columns == LEGACY_POPS_COLUMNS:
            return False
    raise JournalOpenError(
        path,
        f"it is a SQLite database of another program (tables: {', '.join(sorted(tables))[:200]});"
        " left untouched: give --journal a path of its own",
    )


@dataclass
class WalReport:
    """What a frame-by-frame read of the write-ahead log found (before SQLite replays it)."""

    frames: int = 0  # frames in the file
    good: int = 0  # frames that SQLite will replay (checksums chain and salts match)
    bad: int = 0  # frames of the current log after those: dropped by SQLite
    lost_commits: int = 0  # commit frames among them
    skipped: str = ""  # why the log was not checked

    def problem(self) -> str:
        if self.skipped:
            return self.skipped
        if not self.bad:
            return ""
        if not self.lost_commits:
            return (
                f"the write-ahead log has {self.bad} damaged frame(s) after frame {self.good}, none"
                " ending a transaction (a write cut short, e.g. by a power loss): probably nothing"
                " committed is lost"
            )
        return (
            f"the write-ahead log is damaged: its frames {self.good + 1} to {self.good + self.bad}"
            f" (of {self.frames}) are dropped, with {self.lost_commits} committed transaction(s):"
            " pops and contact changes accepted in them are gone"
        )


def scan_wal(journal: Path) -> WalReport:
    """Check each frame's checksum as SQLite does (https://sqlite.org/fileformat2.html#walformat).
    SQLite silently stops its replay at the first bad frame; this says how much it drops."""
    wal = journal.with_name(journal.name + "-wal")
    report = WalReport()
    try:
        size = wal.stat().st_size
    except FileNotFoundError:
        return report
    if size < 32:
        return report
    if size > WAL_SCAN_LIMIT:
        report.skipped = f"the write-ahead log ({size} bytes) is too large to check frame by frame"
        return report
    data = wal.read_bytes()
    magic, _version, page_size, _seq, salt1, salt2, c1, c2 = struct.unpack(">8I", data[:32])
    if magic not in WAL_MAGIC or page_size < 512 or page_size & (page_size - 1):
        report.skipped = f"{wal} has no valid write-ahead log header: SQLite will ignore it"
        return report
    order = ">" if magic & 1 else "<"
    s1, s2 = _checksum(data[:24], order, 0, 0)
    if (s1, s2) != (c1, c2):
        report.skipped = f"{wal} has a damaged header: SQLite will ignore every frame in it"
        return report
    frame_size = 24 + page_size
    report.frames = (size - 32) // frame_size
    pending = 0  # frames since the last good commit frame
    broken_at: int | None = None  # the first frame SQLite will not replay
    last_current = -1  # the last frame after it that still belongs to the current log
    for index in range(report.frames):
        start = 32 + index * frame_size
        header = data[start : start + 24]
        _page, commit, fsalt1, fsalt2, f1, f2 = struct.unpack(">6I", header)
        current = (fsalt1, fsalt2) == (salt1, salt2)  # only this log's frames carry its salts
        if broken_at is None:
            if current:
                t1, t2 = _checksum(header[:8], order, s1, s2)
                t1, t2 = _checksum(data[start + 24 : start + frame_size], order, t1, t2)
                if (t1, t2) == (f1, f2):
                    s1, s2 = t1, t2
                    pending += 1
                    if commit:
                        report.good += pending
                        pending = 0
                    continue
            # a bad checksum, or other salts: an older log's leftovers (the log ends here) or
            # a damaged header; what follows tells them apart
            broken_at = index
        if current:
            last_current = index
            report.lost_commits += bool(commit)
    if broken_at is not None and last_current >= broken_at:
        report.bad = last_current + 1 - report.good
    return report


def _checksum(data: bytes, order: str, s1: int, s2: int) -> tuple[int, int]:
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    mask = 0xFFFFFFFF
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & mask
        s2 = (s2 + words[i + 1] + s1) & mask
    return s1, s2


def quick_check(db: sqlite3.Connection) -> str:
    """'' when SQLite's quick_check finds the database sound, else its first findings."""
    found: list[Any] = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
    return "" if found == ["ok"] else "; ".join(str(item) for item in found)
