"""Reading a diagnostics set (`.002`, `.001`, `.000`, oldest first) and following it across rotation."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .diagnostics import diag_files

BUSY = 1.0  # seconds after a line during which `follow` looks again every `busy_poll`


def last_lines(name: str, count: int, directory: Path | None = None) -> list[str]:
    """The last `count` lines of the set, oldest file first (the lines keep their newline)."""
    lines, handle = tail(name, count, directory)
    if handle is not None:
        handle.close()
    return lines


def tail(name: str, count: int, directory: Path | None = None) -> tuple[list[str], BinaryIO | None]:
    """The last `count` lines of the set, and `.000` open just past them, for `follow(start=…)`.

    `.000` is opened first and read through that handle, so a line written after the last one
    returned is still ahead of the handle: following from it loses nothing. A `.001`/`.002` that is
    the file we hold (rotated in between) is not read twice.
    """
    current = diag_files(name, directory)[0]
    handle = _open(current, at_end=False)
    ours = os.fstat(handle.fileno()).st_ino if handle is not None else None
    lines: deque[str] = deque(maxlen=max(count, 0))
    for path in reversed(diag_files(name, directory)[1:]):
        if ours is not None and _inode(path) == ours:
            continue
        lines.extend(_whole(path))
    if handle is not None:
        data = handle.read()
        complete = data.rfind(b"\n") + 1  # a line still being written is left for follow
        handle.seek(complete - len(data), os.SEEK_CUR)
        lines.extend(data[:complete].decode("utf-8", "replace").splitlines(keepends=True))
    return list(lines), handle


def follow(
    name: str,
    directory: Path | None = None,
    *,
    poll: float = 0.2,
    busy_poll: float = 0.02,
    from_end: bool = True,
    start: BinaryIO | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[str]:
    """Lines appended to `<name>.000` from now on, across rotations, until `stop()` says so.

    `start` is a handle from `tail` (read from where it stands, so nothing written since is
    lost); without it `.000` is opened at its end (`from_end`) or its start. When `.000` is
    rotated to `.001` we finish reading the old file through our open handle before we open the
    new `.000`, so no line written at the switch is missed.

    An idle set is looked at every `poll` seconds; for a second after a line came, every
    `busy_poll` (a log written in bursts shows each burst at once, an idle one costs the same).
    """
    current = diag_files(name, directory)[0]
    handle = start if start is not None else _open(current, at_end=from_end)
    partial = b""  # a line still being written
    last_line = float("-inf")  # time.monotonic() of the last line read
    try:
        while not stop():
            if handle is None:
                handle = _open(current, at_end=False)
                if handle is None:
                    time.sleep(poll)
                    continue
            chunk = handle.readline()
            if chunk:
                last_line = time.monotonic()
                partial += chunk
                if partial.endswith(b"\n"):
                    yield partial.decode("utf-8", "replace")
                    partial = b""
                continue
            if _rotated(handle, current):
                last_line = time.monotonic()  # a rotation: lines are coming
                rest = partial + handle.read()  # the old file does not grow any more
                partial = b""
                yield from rest.decode("utf-8", "replace").splitlines(keepends=True)
                ours = os.fstat(handle.fileno()).st_ino
                handle.close()
                # Open the new .000 first, then read whole any file rotated in between ours
                # and it: several rotations may pass between two polls.
                handle = _open(current, at_end=False)
                newest = os.fstat(handle.fileno()).st_ino if handle is not None else None
                for path in _rotated_since(name, directory, ours, newest):
                    yield from _whole(path)
                continue
            time.sleep(min(busy_poll, poll) if time.monotonic() - last_line < BUSY else poll)
    finally:
        if handle is not None:
            handle.close()


def _rotated_since(name: str, directory: Path | None, ours: int, newest: int | None) -> list[Path]:
    """The `.002`/`.001` files newer than the one we read (inode `ours`), oldest first."""
    older = list(reversed(diag_files(name, directory)[1:]))
    inodes = [_inode(path) for path in older]
    start = inodes.index(ours) + 1 if ours in inodes else 0
    return [
        p for p, ino in zip(older[start:], inodes[start:], strict=True) if ino not in (None, newest)
    ]


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _whole(path: Path) -> list[str]:
    try:
        return path.read_bytes().decode("utf-8", "replace").splitlines(keepends=True)
    except FileNotFoundError:
        return []


def _open(path: Path, at_end: bool) -> BinaryIO | None:
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return None
    if at_end:
        handle.seek(0, os.SEEK_END)
    return handle


def _rotated(handle: BinaryIO, path: Path) -> bool:
    """The name now points to another file (or none): ours was renamed to `.001`."""
    try:
        return os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return True
