"""Shared fixtures: a real hub on a free loopback port, run on its own loop thread."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from spop_cli.hub.server import Hub, HubConfig

# Byte-code files, even where the environment says not to write them (PYTHONDONTWRITEBYTECODE):
# the suite starts a couple of hundred Python processes (hubs, listeners, sources), and each
# compiled spop_cli from source again (0.05-0.1 s of every start); pytest rewrote every test
# module's asserts again on each run (seconds of collection). `__pycache__/` is git-ignored.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


class HubThread:
    """A real hub on 127.0.0.1 with free ports, its loop on a thread, for blocking-API tests."""

    def __init__(self, **options: Any) -> None:
        self.options = {"host": "127.0.0.1", "port": 0, "http_port": 0, "heartbeat": 1.0, **options}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.hub: Hub | None = None
        self.start()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.hub = Hub(HubConfig(**self.options))
        self.call(self.hub.start())
        # a restart binds the same ports again
        self.options["port"] = self.hub.port
        self.options["http_port"] = self.hub.http_port

    def stop(self) -> None:
        if self.hub is not None:
            self.call(self.hub.stop())
            self.hub = None

    @property
    def address(self) -> str:
        return f"{self.options['port']}@127.0.0.1"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.options['http_port']}"

    def publish(self, pops: Any) -> list[str]:
        assert self.hub is not None
        return self.call(self.hub.publish(pops))

    def status(self) -> dict[str, Any]:
        assert self.hub is not None
        return self.call(_status(self.hub))

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def _status(hub: Hub) -> dict[str, Any]:
    return hub.status()


@pytest.fixture(autouse=True)
def diag_dir(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """Every test writes diagnostics under its own tmp dir, never the user's."""
    path = tmp_path / "diag"
    monkeypatch.setenv("SPOP_DIAG_DIR", str(path))
    return path


@pytest.fixture
def hub() -> Iterator[HubThread]:
    running = HubThread()
    yield running
    running.close()


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.002) -> bool:
    """Poll until predicate() is true; the timeout only bounds a failing test."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture
def term_factory(tmp_path: Any) -> Iterator[Any]:
    """`spop` commands in a pseudo-terminal (tests/terminal.py), closed after the test."""
    from terminal import Terminal

    terms: list[Terminal] = []

    def make(*args: str, **kwargs: Any) -> Terminal:
        term = Terminal(*args, tmp_path=tmp_path, **kwargs)
        terms.append(term)
        return term

    yield make
    for term in terms:
        term.close()
