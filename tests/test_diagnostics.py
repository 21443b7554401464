"""Diagnostics sets: .000 current, .001, .002, 1 MB each, never more than three files."""

from __future__ import annotations

import logging

from spop_cli.diagnostics import NumberedRotatingHandler, diag_dir, diag_files, open_diagnostics


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
