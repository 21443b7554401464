"""One client connection on the listener port: frames in, frames out. Knows no sockets' lifecycle."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ..model import Error
from ..protocol import VERSION, FrameDecoder, FrameError, check_client_frame, encode, error_frame

if TYPE_CHECKING:
    from .server import Hub

PONG = encode({"op": "pong"})
PING = encode({"op": "ping"})


def seconds(value: float) -> int | float:
    """A duration as the protocol shows it: an integer when whole (`10`, not `10.0`)."""
    return int(value) if float(value).is_integer() else value


class HubConnection(asyncio.Protocol):
    """Handshake, registrations, acks, pings, and the source ops (publish, contact, status)."""

    __slots__ = (
        "hub",
        "transport",
        "decoder",
        "peer",
        "role",
        "keys",
        "last_rx",
        "last_tx",
        "opened",
        "closed",
        "can_publish",
        "paused",
        "replaying",
        "backlog",
        "out",
    )

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(hub.config.max_frame)
        self.peer = "?"
        self.role: str | None = None  # None until the handshake
        self.keys: set[tuple[str, str]] = set()
        self.last_rx = self.last_tx = self.opened = time.monotonic()
        self.closed = False
        self.can_publish = False
        self.paused = False  # the transport's buffer is over its high-water mark
        self.replaying = False  # inside register(): pending pops are being handed over
        self.backlog: deque[str] = deque()  # ids of pending pops owed, sent as the peer reads
        self.out: list[bytes] = []  # frames written this loop iteration, flushed together

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # pause (and hold the replay of pending pops) well before the slow-consumer limit
        transport.set_write_buffer_limits(high=min(64 * 1024, self.hub.config.max_buffer // 4))  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if len(self.hub.connections) >= self.hub.config.max_connections:
            self.hub.counters["refused_connections"] += 1
            self.fatal(Error.SCREENPOP_Memory_Allocation_Error, "hub at its connection limit")
            return
        self.hub.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        try:
            for frame in self.decoder.feed(data):
                if self.closed:
                    return
                self.handle(check_client_frame(frame))
        except FrameError as exc:
            self.hub.counters["frame_errors"] += 1
            self.hub.log.warning("%s: %s: %s", self.peer, exc.code.value, exc.message)
            self.fatal(exc.code, exc.message, exc.ref)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.hub.connections.discard(self)
        for key in self.keys:
            self.hub.delivery.unsubscribe(key, self)
        self.keys.clear()
        self.backlog.clear()

    def pause_writing(self) -> None:
        # The peer reads slower than we write: hold the replay of pending pops (live pops still
        # go out, bounded by max_buffer).
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._replay()

    def _replay(self) -> None:
        """Send owed pending pops while the transport takes them; skip those gone meanwhile."""
        pending = self.hub.delivery.pending
        while self.backlog and not self.paused and not self.closed:
            entry = pending.get(self.backlog.popleft())
            if entry is not None and entry.key in self.keys:
                self.write(entry.frame)
                self.flush()  # straight through, so pause_writing can stop the replay in time

    # -- out ------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Queue a frame; the hub flushes every written connection once per loop iteration,
        so a commit's answers or a burst of pops leave in one system call."""
        if self.closed:
            return
        out = self.out
        out.append(data)
        if len(out) == 1:
            self.hub.mark_dirty(self)

    def flush(self) -> None:
        transport = self.transport
        out = self.out
        if not out or transport is None:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.closed or transport.is_closing():  # uvloop raises on a closed transport
            return
        transport.write(data)
        self.last_tx = time.monotonic()
        # below the high-water mark (pause_writing not called) the buffer cannot be over the limit
        if self.paused and transport.get_write_buffer_size() > self.hub.config.max_buffer:
            # Slow consumer: drop it rather than grow without bound; its pops stay pending
            # and it gets them again when it comes back and registers.
            self.hub.counters["slow_consumers_dropped"] += 1
            self.hub.log.warning("%s: slow consumer, write buffer over limit: disconnected", self.peer)
            self.closed = True
            transport.abort()

    def deliver(self, pop_id: str, frame: bytes) -> None:
        if self.replaying:
            if self.paused or self.backlog:
                # A registration's pending pops go out as fast as the peer reads them: a large
                # backlog must not look like a slow consumer (it would be dropped on every return).
                self.backlog.append(pop_id)
            else:
                self.write(frame)
                self.flush()
            return
        self.write(frame)

    def reply(self, ref: Any, **fields: Any) -> None:
        frame = {"op": "ok", **fields}
        if ref is not None:
            frame["ref"] = ref
        self.write(encode(frame))

    def error(self, code: Error, message: str, ref: Any = None) -> None:
        self.write(error_frame(code, message, ref))

    def fatal(self, code: Error, message: str, ref: Any = None) -> None:
        """An error frame naming the code, then close: the peer broke the protocol."""
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.write(error_frame(code, message, ref, fatal=True))
            self.closed = True
            self.transport.close()

    # -- in -------------------------------------------------------------------------------
    def handle(self, frame: dict[str, Any]) -> None:
        op = frame["op"]
        ref = frame.get("ref")
        if op == "ack":
            if self.role is None:
                raise FrameError(Error.SCREENPOP_Initialization_Error, "ack before hello", ref)
            for pop_id in frame["ids"]:
                self.hub.ack(pop_id, self.keys)
            return
        if op == "ping":
            self.write(PONG)
            return
        if op == "pong":
            return
        if op == "hello":
            self.hello(frame, ref)
            return
        if self.role is None:
            raise FrameError(Error.SCREENPOP_Initialization_Error, f"{op!r} before hello", ref)
        if op == "register":
            self.register(frame, ref)
        elif op == "unregister":
            key = (frame["media"], frame["resource"])
            if key in self.keys:
                self.keys.discard(key)
                self.hub.delivery.unsubscribe(key, self)
                self.hub.log.info("%s: unregistered %s %s", self.peer, *key)
                self.reply(ref)
            else:
                self.error(Error.SCREENPOP_Wrong_Status, f"not registered for {key[0]} {key[1]}", ref)
        elif op == "status":
            self.reply(ref, status=self.hub.status())
        elif op == "bye":
            self.reply(ref)
            self.flush()
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        elif op in ("publish", "contact"):
            if not self.can_publish:
                self.error(Error.SCREENPOP_Initialization_Error, "this token may not publish", ref)
                return
            if op == "publish":
                self.hub.publish_frame(self, frame.get("pops"), ref)
            else:
                asyncio.get_running_loop().create_task(
                    self.hub.ingest_frame(self, frame.get("events"), ref)
                )

    def hello(self, frame: dict[str, Any], ref: Any) -> None:
        if self.role is not None:
            raise FrameError(Error.SCREENPOP_Wrong_Status, "second hello", ref)
        rights = self.hub.authorize(frame.get("token"))
        if rights is None:
            self.hub.counters["auth_failures"] += 1
            self.hub.log.warning("%s: wrong or missing token", self.peer)
            raise FrameError(Error.SCREENPOP_Initialization_Error, "wrong or missing token", ref)
        self.role = str(frame.get("role") or "listener")
        self.can_publish = rights == "source"
        welcome = {
            "op": "welcome",
            "version": VERSION,
            "server": "spop",
            "heartbeat": seconds(self.hub.config.heartbeat),
            "max_frame": self.hub.config.max_frame,
        }
        if ref is not None:
            welcome["ref"] = ref
        self.write(encode(welcome))

    def register(self, frame: dict[str, Any], ref: Any) -> None:
        key = (frame["media"], frame["resource"])
        if key in self.keys:
            self.error(
                Error.SCREENPOP_Already_Registered, f"already registered for {key[0]} {key[1]}", ref
            )
            return
        if len(self.keys) >= self.hub.config.max_registrations:
            self.error(Error.SCREENPOP_Cannot_Register, "too many registrations on one connection", ref)
            return
        self.keys.add(key)
        self.reply(ref)  # before the pending pops, so the client is Up when they arrive
        self.replaying = True
        try:
            self.hub.delivery.subscribe(key, self)
        finally:
            self.replaying = False
        self.hub.log.info("%s: registered %s %s", self.peer, *key)
