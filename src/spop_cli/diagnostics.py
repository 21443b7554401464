"""Diagnostics files: every level, `.000` current, `.001`, `.002`, 1 MB each, as the vendor guide describes them."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from .model import Error, ScreenPopError

MAX_BYTES = 1024 * 1024
# The writer thread is woken at most once per WRITE_DELAY seconds (sooner when WRITE_BATCH lines
# wait, or on flush/close): a line is in the file at most that much later than it was logged.
WRITE_DELAY = 0.05
WRITE_BATCH = 1000
KEEP = 3  # .000, .001, .002
FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s %(message)s"
DATEFMT = "%Y-%m-%dT%H:%M:%S"


def diag_dir() -> Path:
    """`SPOP_DIAG_DIR`, else the platform's user log directory."""
    env = os.environ.get("SPOP_DIAG_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_log_dir("spop", appauthor=False))


def diag_files(name: str, directory: Path | None = None) -> list[Path]:
    """The set's files, current first."""
    base = (directory or diag_dir()) / name
    return [base.with_name(f"{name}.{i:03d}") for i in range(KEEP)]


class _Formatter(logging.Formatter):
    """The standard formatter, with the date and time formatted once per second, not per line
    (time.strftime was a tenth of a listener's diagnostics cost at 1,000 pops a second)."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._text = super().formatTime(record, datefmt)
            self._second = second
        return self._text

    def line(self, created: float, levelname: str, name: str, message: str) -> str:
        """The line `format` gives a record made at `created` (FORMAT), without the record."""
        second = int(created)
        if second != self._second:
            self._text = time.strftime(self.datefmt or DATEFMT, self.converter(created))
            self._second = second
        return (
            f"{self._text}.{int((created - second) * 1000):03d} {levelname:<7} {name} {message}\n"
        )


class NumberedRotatingHandler(logging.Handler):
    """Writes `<name>.000`; past max_bytes shifts `.000`→`.001`→`.002` and drops the old `.002`.

    The caller only formats the line; a thread of the handler's own writes it. A write() to a
    file can block for 100 ms and more while the file system commits (another process's fsync,
    a rename), and the callers are event loops: the hub's, or `spop listen`'s with a line per
    pop. Lines are written in order, flushed as each batch is written; `flush()` waits for them.

    The thread is woken once per batch, not per line: a line is appended to a deque (no lock,
    no wake) and only the first line after a write sets the wake-up, after which the thread
    waits WRITE_DELAY (or until WRITE_BATCH lines wait) and writes all that came meanwhile. At
    a pop a millisecond that is one thread hand-off per 50 ms instead of one per pop.
    """

    def __init__(self, directory: Path, name: str, max_bytes: int = MAX_BYTES) -> None:
        super().__init__(logging.DEBUG)
        self.files = diag_files(name, directory)
        self.max_bytes = max_bytes
        self._stream = open(self.files[0], "a", encoding="utf-8")  # noqa: SIM115
        # bytes in `.000`, counted here: a text file's tell() flushes and seeks, twice a line
        self._size = self._stream.tell()
        self._own_formatter = _Formatter(FORMAT, DATEFMT)
        self.setFormatter(self._own_formatter)
        self._lines: deque[str | threading.Event | None] = deque()
        self._due = False  # the writer has been woken for what is in _lines (or is writing)
        self._wake = threading.Event()  # something waits in _lines
        self._now = threading.Event()  # write it without waiting WRITE_DELAY (flush, close, full)
        self._closed = False
        self._writer = threading.Thread(
            target=self._write_lines, name=f"spop-diag-{name}", daemon=True
        )
        self._writer.start()

    def _put(self, item: str | threading.Event | None) -> None:
        lines = self._lines
        lines.append(item)
        if item.__class__ is not str or len(lines) >= WRITE_BATCH:
            self._due = True
            self._now.set()
            self._wake.set()
        elif not self._due:
            self._due = True
            self._wake.set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # a diagnostics failure must never break a pop
            self.handleError(record)
            return
        if not self._closed:
            self._put(line)

    def put_line(self, levelname: str, name: str, message: str) -> bool:
        """Queue the line a record of `name` at `levelname` with `message` would give, made now;
        False (nothing queued) when a formatter of someone else's would write it otherwise."""
        formatter = self._own_formatter
        if self.formatter is not formatter:
            return False
        if not self._closed:
            self._put(formatter.line(time.time(), levelname, name, message))
        return True

    def flush(self) -> None:
        """Wait (at most 5 s) until every line emitted so far is in the file."""
        if self._closed or not self._writer.is_alive():
            return
        written = threading.Event()
        self._put(written)
        written.wait(5.0)

    def _write_lines(self) -> None:
        lines = self._lines
        while True:
            self._wake.wait()
            self._now.wait(WRITE_DELAY)  # let the lines of the next WRITE_DELAY come along
            # cleared before _due: a line put after this sets the wake-up again
            self._wake.clear()
            self._now.clear()
            self._due = False
            batch: list[str] = []
            waiters: list[threading.Event] = []
            while lines:
                item = lines.popleft()
                if item is None:
                    self._write(batch)
                    for waiter in waiters:
                        waiter.set()
                    return
                if item.__class__ is str:
                    batch.append(item)  # type: ignore[arg-type]
                else:
                    waiters.append(item)  # type: ignore[arg-type]
            if batch:
                self._write(batch)
            for waiter in waiters:
                waiter.set()

    def _write(self, batch: list[str]) -> None:
        try:
            text = "".join(batch)
            size = len(text.encode("utf-8"))
            if self._size + size <= self.max_bytes:  # the usual batch: no rotation within it
                self._stream.write(text)
                self._size += size
                self._stream.flush()
                return
            for line in batch:
                size = len(line.encode("utf-8"))
                if self._size + size > self.max_bytes and self._size > 0:
                    self._stream.flush()
                    self._rotate()
                self._stream.write(line)
                self._size += size
            self._stream.flush()
        except Exception:  # a full disk: the lines are lost, the program goes on
            import traceback

            traceback.print_exc()

    def _rotate(self) -> None:
        self._stream.close()
        for i in range(KEEP - 1, 0, -1):
            older, newer = self.files[i], self.files[i - 1]
            if newer.exists():
                os.replace(newer, older)
        self._stream = open(self.files[0], "a", encoding="utf-8")  # noqa: SIM115
        self._size = self._stream.tell()

    def close(self) -> None:
        """Write what is queued, then close the file (logging.shutdown calls it at exit)."""
        if not self._closed:
            self._closed = True
            self._put(None)
            if self._writer.is_alive() and self._writer is not threading.current_thread():
                self._writer.join(5.0)
            if not self._stream.closed:
                self._stream.close()
        super().close()

    @property
    def closed(self) -> bool:
        return self._closed


_handlers: dict[tuple[str, str], NumberedRotatingHandler] = {}
_handlers_lock = threading.Lock()


def open_diagnostics(name: str, directory: Path | None = None) -> logging.Logger:
    """The logger `spop.<name>` writing every level to the `<name>` set; one handler per set.

    Raises SCREENPOP_Cannot_Create_Diags when the directory or file cannot be made.
    """
    folder = directory or diag_dir()
    key = (str(folder), name)
    logger = logging.getLogger(f"spop.{name}")
    logger.setLevel(logging.DEBUG)
    with _handlers_lock:
        if key in _handlers and not _handlers[key].closed:
            return logger
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handler = NumberedRotatingHandler(folder, name)
        except OSError as exc:
            raise ScreenPopError(
                Error.SCREENPOP_Cannot_Create_Diags, f"cannot create diagnostics in {folder}: {exc}"
            ) from exc
        for old in [h for h in logger.handlers if isinstance(h, NumberedRotatingHandler)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        _handlers[key] = handler
    return logger


def log_line(logger: logging.Logger, level: int, msg: str, *args: Any) -> None:
    """`logger.log(level, msg, *args)`: the same line in the same file, but without a LogRecord
    (its caller's frame and line number looked up, its thread and process names) when a
    diagnostics set is the only place the line goes; else through `logger.log` as usual.

    For the lines written per pop (`spop listen`'s event loop): a LogRecord was a fifth of the
    listener's work per pop. `args` are positional (no mapping), as in every caller's message."""
    handler = _only_diagnostics(logger, level)
    if handler is not None:
        try:
            message = msg % args if args else msg
        except (TypeError, ValueError):  # let logging report the bad format as it does
            handler = None
        else:
            if handler.put_line(logging.getLevelName(level), logger.name, message):
                return
    logger.log(level, msg, *args, stacklevel=2)


def _only_diagnostics(logger: logging.Logger, level: int) -> NumberedRotatingHandler | None:
    """The one handler a record of `level` from `logger` would reach, when it is a diagnostics
    set's without filters (none on the logger either); None otherwise, or when not enabled."""
    if logger.disabled or logger.filters or not logger.isEnabledFor(level):
        return None
    found = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if level < handler.level:
                continue
            if (
                found is not None
                or handler.__class__ is not NumberedRotatingHandler
                or handler.filters
            ):
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if found is None and logging.lastResort is not None and level >= logging.lastResort.level:
        return None  # no handler at all: logging's last resort prints it on stderr
    return found  # type: ignore[return-value]


def flush_diagnostics(logger: logging.Logger) -> None:
    """Wait until the lines `logger` emitted so far are in its files (they are written by a thread)."""
    for handler in logger.handlers:
        handler.flush()


def close_diagnostics(directory: str | Path) -> None:
    """Close and forget the handlers writing into `directory` (`spop demo` then removes it)."""
    with _handlers_lock:
        for key in [k for k in _handlers if k[0] == str(directory)]:
            handler = _handlers.pop(key)
            logging.getLogger(f"spop.{key[1]}").removeHandler(handler)
            handler.close()
