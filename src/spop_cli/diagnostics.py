"""Diagnostics files: every level, `.000` current, `.001`, `.002`, 1 MB each, as the vendor guide describes them."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from .model import Error, ScreenPopError

MAX_BYTES = 1024 * 1024
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


class NumberedRotatingHandler(logging.Handler):
    """Writes `<name>.000`; past max_bytes shifts `.000`→`.001`→`.002` and drops the old `.002`."""

    def __init__(self, directory: Path, name: str, max_bytes: int = MAX_BYTES) -> None:
        super().__init__(logging.DEBUG)
        self.files = diag_files(name, directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._stream = open(self.files[0], "a", encoding="utf-8")  # noqa: SIM115
        # bytes in `.000`, counted here: a text file's tell() flushes and seeks, twice a line
        self._size = self._stream.tell()
        self.setFormatter(_Formatter(FORMAT, DATEFMT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            data = line.encode("utf-8")
            with self._lock:
                if self._size + len(data) > self.max_bytes and self._size > 0:
                    self._rotate()
                self._stream.write(line)
                self._stream.flush()
                self._size += len(data)
        except Exception:  # a diagnostics failure must never break a pop
            self.handleError(record)

    def _rotate(self) -> None:
        self._stream.close()
        for i in range(KEEP - 1, 0, -1):
            older, newer = self.files[i], self.files[i - 1]
            if newer.exists():
                os.replace(newer, older)
        self._stream = open(self.files[0], "a", encoding="utf-8")  # noqa: SIM115
        self._size = self._stream.tell()

    def close(self) -> None:
        with self._lock:
            if not self._stream.closed:
                self._stream.close()
        super().close()


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
        if key in _handlers and not _handlers[key]._stream.closed:
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


def close_diagnostics(directory: str | Path) -> None:
    """Close and forget the handlers writing into `directory` (`spop demo` then removes it)."""
    with _handlers_lock:
        for key in [k for k in _handlers if k[0] == str(directory)]:
            handler = _handlers.pop(key)
            logging.getLogger(f"spop.{key[1]}").removeHandler(handler)
            handler.close()
