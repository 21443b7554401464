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


def test_log_line_writes_what_logger_log_writes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`log_line` (the per-pop line, without a LogRecord) gives the line `logger.info` gives."""
    from spop_cli.diagnostics import log_line

    logger = open_diagnostics("same", tmp_path)
    args = ("b-1", "telephone", "6000", "12345", "File d'attente", 10)
    logger.info("pop %s %s %s from %s queue %r wait %s", *args)
    log_line(logger, logging.INFO, "pop %s %s %s from %s queue %r wait %s", *args)
    logger.warning("plain %d%%", 5)
    log_line(logger, logging.WARNING, "plain %d%%", 5)
    log_line(logger, logging.DEBUG, "no args 100%")
    logger.debug("no args 100%")
    flush_diagnostics(logger)
    lines = (tmp_path / "same.000").read_text().splitlines()
    assert len(lines) == 6
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} "
    import re

    for line in lines:
        assert re.match(stamp, line), line
    bodies = [line[24:] for line in lines]
    assert (
        bodies[0]
        == bodies[1]
        == 'INFO    spop.same pop b-1 telephone 6000 from 12345 queue "File d\'attente" wait 10'
    )
    assert bodies[2] == bodies[3] == "WARNING spop.same plain 5%"
    assert bodies[4] == bodies[5] == "DEBUG   spop.same no args 100%"


def test_log_line_reaches_every_other_handler_as_a_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Another handler on the way (the root's, a test's) gets the usual record, and a filter
    still applies: the shortcut is only taken when the diagnostics file is all there is."""
    from spop_cli.diagnostics import log_line

    logger = open_diagnostics("others", tmp_path)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    logging.getLogger().addHandler(keep)
    try:
        log_line(logger, logging.INFO, "to both %s", "x")
    finally:
        logging.getLogger().removeHandler(keep)
    logger.addFilter(lambda record: "secret" not in record.getMessage())
    try:
        log_line(logger, logging.INFO, "a secret %s", "y")
        log_line(logger, logging.INFO, "after the filter %s", "z")
    finally:
        logger.filters.clear()
    flush_diagnostics(logger)
    text = (tmp_path / "others.000").read_text()
    assert [r.getMessage() for r in seen] == ["to both x"]
    assert seen[0].funcName == "test_log_line_reaches_every_other_handler_as_a_record"
    assert "to both x" in text and "after the filter z" in text and "secret" not in text
