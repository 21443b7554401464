"""One client connection on the listener port: frames in, frames out. Knows no sockets' lifecycle."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ..model import Error
from ..protocol import VERSION, FrameDecoder, FrameError, check_client_frame, encode, error_frame

if TYPE_CHECKING:
    from .delivery import Pending
    from .routing import Key
    from .server import Hub

PONG = encode({"op": "pong"})
PING = encode({"op": "ping"})
REPLAY_CHUNK = 16 * 1024  # replayed bytes handed to the transport at a time
LIVE_PRUNE_MIN = 1024  # queued live ids before the first look for settled ones
LINGER = 1.0  # s a refused peer may go on sending (its hello) after our error frame, unread
BUFFER_SHARES_MAX = 64  # registrations a connection's slow-consumer limit grows with, at most


def slow_limit(max_buffer: int, registrations: int) -> int:
    """A connection's unsent bytes before it is dropped as a slow consumer: `max_buffer` per
    registration, up to BUFFER_SHARES_MAX of them. The listeners of one process share one
    connection; a burst that separate connections would each have buffered must not drop it."""
    return max_buffer * min(max(registrations, 1), BUFFER_SHARES_MAX)


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
        "window",
        "inflight",
        "live",
        "live_prune_at",
        "backlog",
        "out",
        "updates",
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
        # Flow control: at most `window` pops sent and not yet settled (acked, withdrawn,
        # expired); the others wait here as ids and go out as slots free up.
        self.window = hub.config.max_inflight
        self.inflight: dict[str, Key] = {}  # pop id → its key, sent and still pending
        self.live: deque[str] = deque()  # live pops waiting for a slot, oldest first
        self.live_prune_at = LIVE_PRUNE_MIN  # drop settled ids from `live` past this length
        self.backlog: deque[str] = deque()  # pending pops owed since `register`, oldest first
        self.out: list[bytes] = []  # frames written this loop iteration, flushed together
        self.updates = False  # protocol 2 with `"updates": true`: contact updates sent too

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
        if self.closed:  # after a fatal error: lingering, what comes is dropped unread
            return
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
        # a line per connection that said hello (`spop serve --verbose` shows it)
        if self.role is not None:
            self.hub.log.info(
                "%s: %s disconnected%s", self.peer, self.role, f": {exc}" if exc else ""
            )
        self._let_go()

    def _let_go(self) -> None:
        """Out of the hub's connections, its keys and pops given up: at once after a fatal
        error (the socket lingers unread), or when the connection is lost."""
        self.closed = True
        self.hub.connections.discard(self)
        for key in self.keys:
            self.hub.delivery.unsubscribe(key, self)
        self.keys.clear()
        self.inflight.clear()
        self.live.clear()
        self.backlog.clear()

    def pause_writing(self) -> None:
        # The peer reads slower than we write: hold the replay of pending pops (live pops still
        # go out while the window allows, bounded by max_buffer).
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    # -- pops: a window of unacknowledged ones ---------------------------------------------
    def deliver(self, pending: Pending) -> None:
        """A live pop: out now if the window has room, else queued (ahead of any replay)."""
        if self.closed or (pending.change and not self.updates):
            return
        if self.live or len(self.inflight) >= self.window:
            live = self.live
            live.append(pending.id)
            if len(live) >= self.live_prune_at:
                self._prune_live()
            return
        self._send(pending)

    def owe(self, ids: list[str]) -> None:
        """A registration's pending pops: replayed as the window and the transport allow."""
        self.backlog.extend(ids)
        self._pump()

    def settled(self, pop_id: str) -> None:
        """A pop left pending: if it was in flight here, its slot goes to the next one owed."""
        if self.inflight.pop(pop_id, None) is not None and (self.live or self.backlog):
            self._pump()

    def _send(self, pending: Pending) -> None:
        self._in_flight(pending)
        self.write(pending.frame)

    def _in_flight(self, pending: Pending) -> None:
        """Count a pop (or change) as sent here and hold its slot until it is settled."""
        self.inflight[pending.id] = pending.key
        pending.sent += 1
        if pending.change:
            self.hub.delivery.changes_delivered += 1
        else:
            self.hub.delivery.delivered += 1

    def _pump(self) -> None:
        """Fill the window: live pops first (a call ringing now beats one that waited), then
        the replay while the transport takes it; ids no longer pending are skipped."""
        if self.closed:
            return
        pending = self.hub.delivery.pending
        inflight, window, keys = self.inflight, self.window, self.keys
        live, backlog = self.live, self.backlog
        updates = self.updates
        while live and len(inflight) < window:
            entry = pending.get(live.popleft())
            if entry is not None and entry.key in keys and entry.id not in inflight:
                self._send(entry)
        unflushed = 0
        while backlog and len(inflight) < window and not self.paused and not self.closed:
            entry = pending.get(backlog.popleft())
            if (
                entry is not None
                and entry.key in keys
                and entry.id not in inflight
                and (updates or not entry.change)
            ):
                self._send(entry)
                unflushed += len(entry.frame)
                if unflushed >= REPLAY_CHUNK:
                    # through to the transport now, so pause_writing can stop the replay in time
                    self.flush()
                    unflushed = 0

    def _prune_live(self) -> None:
        """Drop queued ids no longer pending (a twin listener acked them), so the queue of a
        connection that stopped reading stays within twice what is pending for it."""
        pending = self.hub.delivery.pending
        self.live = deque(pop_id for pop_id in self.live if pop_id in pending)
        self.live_prune_at = max(LIVE_PRUNE_MIN, 2 * len(self.live))

    def _release(self, key: Key) -> None:
        """Unregistered from `key`: its pops in flight here hold no slot any more."""
        for pop_id in [i for i, k in self.inflight.items() if k == key]:
            del self.inflight[pop_id]
        self._pump()

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
        if self.paused and transport.get_write_buffer_size() > slow_limit(
            self.hub.config.max_buffer, len(self.keys)
        ):
            # Slow consumer: drop it rather than grow without bound; its pops stay pending
            # and it gets them again when it comes back and registers.
            self.hub.counters["slow_consumers_dropped"] += 1
            self.hub.log.warning(
                "%s: slow consumer, write buffer over limit: disconnected", self.peer
            )
            self.closed = True
            transport.abort()

    def reply(self, ref: Any, **fields: Any) -> None:
        frame = {"op": "ok", **fields}
        if ref is not None:
            frame["ref"] = ref
        self.write(encode(frame))

    def error(self, code: Error, message: str, ref: Any = None) -> None:
        self.write(error_frame(code, message, ref))

    def fatal(self, code: Error, message: str, ref: Any = None) -> None:
        """An error frame naming the code, then close: the peer broke the protocol (or the hub
        is full). Only our side closes at once: a peer whose next frames were on their way (a
        hello right behind a refusal at the connection limit) would get a reset from a full
        close, and its kernel would throw the error frame away unread. Its frames are dropped
        for LINGER seconds, or until it closes."""
        transport = self.transport
        if transport is not None and not self.closed:
            self.flush()
            transport.write(error_frame(code, message, ref, fatal=True))
            self._let_go()
            if transport.can_write_eof():
                transport.write_eof()
                asyncio.get_running_loop().call_later(LINGER, transport.close)
            else:  # TLS: no half-close
                transport.close()

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
                self._release(key)
            else:
                self.error(
                    Error.SCREENPOP_Wrong_Status, f"not registered for {key[0]} {key[1]}", ref
                )
        elif op == "status":
            self.reply(ref, status=self.hub.status())
        elif op == "bye":
            self.reply(ref)
            self.flush()
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        elif op in ("publish", "contact", "open_contacts"):
            if not self.can_publish:
                what = "read a source's contacts" if op == "open_contacts" else "publish"
                self.error(Error.SCREENPOP_Initialization_Error, f"this token may not {what}", ref)
                return
            if op == "publish":
                self.hub.publish_frame(self, frame.get("pops"), ref)
            elif op == "contact":
                asyncio.get_running_loop().create_task(
                    self.hub.ingest_frame(self, frame.get("events"), ref, frame.get("origin"))
                )
            else:
                asyncio.get_running_loop().create_task(
                    self.hub.open_contacts_frame(self, frame["origin"], ref)
                )

    def hello(self, frame: dict[str, Any], ref: Any) -> None:
        if self.role is not None:
            raise FrameError(Error.SCREENPOP_Wrong_Status, "second hello", ref)
        rights = self.hub.authorize(frame.get("token"))
        if rights is None:
            self.hub.counters["auth_failures"] += 1
            self.hub.log.warning("%s: wrong or missing token", self.peer)
            # fatal, but not a bad frame: counted in auth_failures only
            self.fatal(Error.SCREENPOP_Initialization_Error, "wrong or missing token", ref)
            return
        self.role = str(frame.get("role") or "listener")
        self.can_publish = rights == "source"
        version = frame["version"]  # 1 or 2, checked; a protocol-1 client sees what it always saw
        self.updates = version >= 2 and frame.get("updates") is True
        welcome = {
            "op": "welcome",
            "version": min(version, VERSION),
            "server": "spop",
            "heartbeat": seconds(self.hub.config.heartbeat),
            "max_frame": self.hub.config.max_frame,
            "pop_ttl": seconds(self.hub.config.pop_ttl),
            "max_registrations": self.hub.config.max_registrations,
        }
        if version >= 2:
            welcome["updates"] = self.updates
        if ref is not None:
            welcome["ref"] = ref
        self.write(encode(welcome))
        self.hub.log.info("%s: %s connected", self.peer, self.role)

    def register(self, frame: dict[str, Any], ref: Any) -> None:
        key = (frame["media"], frame["resource"])
        if key in self.keys:
            self.error(
                Error.SCREENPOP_Already_Registered, f"already registered for {key[0]} {key[1]}", ref
            )
            return
        if len(self.keys) >= self.hub.config.max_registrations:
            self.error(
                Error.SCREENPOP_Cannot_Register, "too many registrations on one connection", ref
            )
            return
        self.keys.add(key)
        self.reply(ref)  # before the pending pops, so the client is Up when they arrive
        self.hub.delivery.subscribe(key, self)
        self.hub.log.info("%s: registered %s %s", self.peer, *key)
