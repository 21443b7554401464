"""Diagnostics sets: .000 current, .001, .002, 1 MB each, never more than three files."""

from __future__ import annotations

import logging

from spop_cli.diagnostics import (
    NumberedRotatingHandler,
    diag_dir,
    diag_files,
    flush_diagnostics,
    open_diagnostics,
)


def test_rotation_keeps_three_numbered_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    handler = NumberedRotatingHandler(tmp_path, "listener", max_bytes=1000)
    logger = logging.getLogger("spop.test.rotation")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(200):
            logger.debug("line %04d %s", i, "x" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["listener.000", "listener.001", "listener.002"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 1000
    # newest lines in .000, older in .001, older still in .002; the oldest were dropped
    current, previous, oldest = (p.read_text() for p in diag_files("listener", tmp_path))
    assert "line 0199" in current
    assert int(previous.splitlines()[-1].split()[4]) < int(current.splitlines()[0].split()[4])
    assert int(oldest.splitlines()[-1].split()[4]) < int(previous.splitlines()[0].split()[4])
    assert "line 0000" not in current + previous + oldest


def test_every_level_is_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    logger = open_diagnostics("levels", tmp_path)
    logger.debug("a debug line")
    logger.error("an error line")
    flush_diagnostics(logger)  # written by the handler's thread
    text = (tmp_path / "levels.000").read_text()
    assert "DEBUG" in text and "a debug line" in text and "ERROR" in text


def test_diag_dir_follows_the_environment(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SPOP_DIAG_DIR", str(tmp_path / "elsewhere"))
    assert diag_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("SPOP_DIAG_DIR")
    assert diag_dir().name  # the platform's user log dir


def test_initialized_listener_writes_its_diagnostics(hub, diag_dir) -> None:  # type: ignore[no-untyped-def]
    from spop_cli import ScreenPopTelephoneListener

    listener = ScreenPopTelephoneListener()
    listener.initialize(hub.address)
    listener.start_listening("13579")
    listener.shutdown()
    text = (diag_dir / "listener.000").read_text()
    assert "initialize" in text and "Status_Up" in text


def test_lines_are_written_by_the_handlers_thread_in_order(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A write() to a file can block while the file system commits: the hub's and `spop listen`'s
    event loops only format the line; the handler's own thread writes it."""
    import threading

    writers: list[int] = []
    real_write = NumberedRotatingHandler._write

    def recording_write(self, batch):  # type: ignore[no-untyped-def]
        writers.append(threading.get_ident())
        real_write(self, batch)

    monkeypatch.setattr(NumberedRotatingHandler, "_write", recording_write)
    logger = open_diagnostics("threaded", tmp_path)
    for i in range(500):
        logger.info("line %03d", i)
    flush_diagnostics(logger)
    lines = (tmp_path / "threaded.000").read_text().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == [f"{i:03d}" for i in range(500)]
    assert writers and threading.get_ident() not in writers
