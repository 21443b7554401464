"""Reading a diagnostics set (`.002`, `.001`, `.000`, oldest first) and following it across rotation."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .diagnostics import diag_files


def last_lines(name: str, count: int, directory: Path | None = None) -> list[str]:
    """The last `count` lines of the set, oldest file first (the lines keep their newline)."""
    lines: deque[str] = deque(maxlen=max(count, 0))
    for path in reversed(diag_files(name, directory)):
        try:
            with open(path, encoding="utf-8", errors="replace") as file:
                lines.extend(file)
        except FileNotFoundError:
            continue
    return list(lines)


def follow(
    name: str,
    directory: Path | None = None,
    *,
    poll: float = 0.2,
    from_end: bool = True,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[str]:
    """Lines appended to `<name>.000` from now on, across rotations, until `stop()` says so.

    When `.000` is rotated to `.001` we finish reading the old file through our open handle
    before we open the new `.000`, so no line written at the switch is missed.
    """
    current = diag_files(name, directory)[0]
    handle = _open(current, at_end=from_end)
    partial = b""  # a line still being written
    try:
        while not stop():
            if handle is None:
                handle = _open(current, at_end=False)
                if handle is None:
                    time.sleep(poll)
                    continue
            chunk = handle.readline()
            if chunk:
                partial += chunk
                if partial.endswith(b"\n"):
                    yield partial.decode("utf-8", "replace")
                    partial = b""
                continue
            if _rotated(handle, current):
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
            time.sleep(poll)
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
