"""The listener's ack leaves in the loop turn its pop was read in, and diagnostics are batched.

The hub here is a plain blocking socket on its own thread (not on the listener's loop), so the test
can block the listener's loop right after handing it a read: an ack deferred to a later loop turn
would then never reach the hub.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path

import pytest

from spop_cli import LinkPool, diagnostics
from spop_cli.listener.core import AsyncListener
from spop_cli.pops import normalize_pop
from spop_cli.protocol import pop_frame


class BlockingHub:
    """Welcomes one listener, registers it, and records the ids of every `ack` it receives.
    `before_unregister_ok`: frames sent just before the answer to `unregister` (a pop that was
    on its way when the hub read it)."""

    def __init__(self, before_unregister_ok: bytes = b"") -> None:
        self.before_unregister_ok = before_unregister_ok
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.acked: list[str] = []
        self.ack_frames: list[list[str]] = []  # the ids of each `ack` frame, frame by frame
        self.got_ack = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        buffer = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            *lines, buffer = (buffer + data).split(b"\n")
            for line in lines:
                frame = json.loads(line)
                op, ref = frame["op"], frame.get("ref")
                if op == "hello":
                    welcome = {"op": "welcome", "version": frame["version"], "server": "spop",
                               "heartbeat": 600, "max_frame": 65536, "pop_ttl": 120, "ref": ref}  # fmt: skip
                    conn.sendall(json.dumps(welcome).encode() + b"\n")
                elif op in ("register", "unregister", "bye"):
                    if op == "unregister":
                        conn.sendall(self.before_unregister_ok)
                    conn.sendall(json.dumps({"op": "ok", "ref": ref}).encode() + b"\n")
                elif op == "ack":
                    self.acked.extend(frame["ids"])
                    self.ack_frames.append(frame["ids"])
                    self.got_ack.set()


def _pop(pop_id: str) -> dict[str, object]:
    return normalize_pop(
        {"id": pop_id, "media": "telephone", "resource": "4711", "source": "12345"},
        "2026-12-03T00:00:00.000Z",
    )


def test_ack_leaves_in_the_turn_of_the_read() -> None:
    hub = BlockingHub()
    seen: list[str] = []

    async def main() -> tuple[bool, list[str]]:
        listener = AsyncListener("telephone")
        listener.on_screen_pop(lambda event: seen.append(event.id))
        await listener.initialize(f"{hub.port}@127.0.0.1")
        await listener.start_listening("4711")
        link = listener._link
        assert link is not None
        # one read carrying two pops, as the loop would hand it over; then the loop is blocked
        link.data_received(pop_frame(_pop("p-1")) + pop_frame(_pop("p-2")))
        acked_in_turn = hub.got_ack.wait(5.0)
        acked = list(hub.acked)
        await listener.shutdown()
        return acked_in_turn, acked

    acked_in_turn, acked = asyncio.run(main())
    assert seen == ["p-1", "p-2"]
    assert acked_in_turn is True
    assert acked == ["p-1", "p-2"]


def test_an_ack_outside_a_read_still_leaves(tmp_path: Path) -> None:
    """A pop handled by an async callback is acked when that completes (not in a read)."""
    hub = BlockingHub()

    async def main() -> list[str]:
        listener = AsyncListener("telephone")

        async def slow(event: object) -> None:
            await asyncio.sleep(0.05)

        listener.on_screen_pop(slow)
        await listener.initialize(f"{hub.port}@127.0.0.1")
        await listener.start_listening("4711")
        assert listener._link is not None
        listener._link.data_received(pop_frame(_pop("p-9")))
        assert not hub.got_ack.wait(0.01)  # not before the callback completed
        for _ in range(500):
            if hub.acked:
                break
            await asyncio.sleep(0.01)
        await listener.shutdown()
        return list(hub.acked)

    assert asyncio.run(main()) == ["p-9"]


def test_diagnostics_lines_batched_in_order(tmp_path: Path) -> None:
    """Lines logged in a burst reach the file in order, in a few writes, not one per line."""
    writes: list[int] = []

    class Counting(diagnostics.NumberedRotatingHandler):
        def _write(self, batch: list[str]) -> None:
            writes.append(len(batch))
            super()._write(batch)

    handler = Counting(tmp_path, "burst")
    try:
        for i in range(500):
            handler.put_line("INFO", "spop.test", f"line {i}")
        handler.flush()
        text = (tmp_path / "burst.000").read_text(encoding="utf-8")
        assert [line.split(" spop.test ", 1)[1] for line in text.splitlines()] == [
            f"line {i}" for i in range(500)
        ]
        assert sum(writes) == 500
        assert len(writes) < 50  # one write per line would be 500
        # without a flush, a line still reaches the file (after the writer's delay)
        handler.put_line("INFO", "spop.test", "late")
        for _ in range(500):
            if "late" in (tmp_path / "burst.000").read_text(encoding="utf-8"):
                break
            threading.Event().wait(0.01)
        assert (
            (tmp_path / "burst.000")
            .read_text(encoding="utf-8")
            .endswith(" INFO    spop.test late\n")
        )
    finally:
        handler.close()
    # close writes what is queued
    handler2 = diagnostics.NumberedRotatingHandler(tmp_path, "closing")
    handler2.put_line("WARNING", "spop.test", "last words")
    handler2.close()
    assert (
        (tmp_path / "closing.000")
        .read_text(encoding="utf-8")
        .endswith(" WARNING spop.test last words\n")
    )


@pytest.mark.parametrize("shared", [False, True], ids=["own-connection", "shared-connection"])
def test_a_pop_that_crosses_the_unregister_is_neither_handled_nor_acked(shared: bool) -> None:
    """The hub sent it before it read our `unregister`: an ack after the unregister would be
    refused (unknown) while the callback had run, and the next run would handle it again."""
    hub = BlockingHub(before_unregister_ok=pop_frame(_pop("p-late")))
    seen: list[str] = []

    async def main() -> None:
        listener = AsyncListener("telephone", pool=LinkPool() if shared else None)
        listener.on_screen_pop(lambda event: seen.append(event.id))
        await listener.initialize(f"{hub.port}@127.0.0.1")
        await listener.start_listening("4711")
        await listener.stop_listening()
        await asyncio.sleep(0.1)  # an ack, had one been made, would have left by now
        await listener.shutdown()

    asyncio.run(main())
    assert seen == []
    assert hub.acked == []
