"""Frames between listeners (and sources) and the hub: NDJSON, limits, validation. Pure.

One frame is one JSON object on one line, UTF-8, ended by `\\n`. See docs/protocol.md.
"""

from __future__ import annotations

from typing import Any

import orjson

from .model import Error, Media, ScreenPopError, validate_resource

VERSION = 2  # the newest version the hub speaks; it also speaks every one in VERSIONS
VERSIONS = (1, 2)  # 2: contact updates (`change` frames) for clients that ask (`"updates": true`)
MAX_FRAME = 64 * 1024  # bytes in one line, newline excluded
HEARTBEAT = 10.0  # seconds between pings when a side has sent nothing else
MAX_DEPTH = 64  # arrays and objects nested in one frame or body; a pop needs 4
MAX_ORIGIN = 128  # a source's name in `contact` and `open_contacts` frames

# Who may send what. A frame of the wrong direction is a protocol error.
CLIENT_OPS = frozenset(
    {
        "hello",
        "register",
        "unregister",
        "ack",
        "ping",
        "pong",
        "publish",
        "contact",
        "open_contacts",
        "status",
        "bye",
    }
)
HUB_OPS = frozenset({"welcome", "ok", "error", "pop", "change", "ping", "pong"})
CHANGE_HEAD = b'{"op":"change"'  # how a journalled frame is told to be a change, not a pop


class FrameError(ScreenPopError):
    """A frame the peer must not have sent; the connection is closed after the error frame."""

    def __init__(self, code: Error, message: str, ref: Any = None) -> None:
        super().__init__(code, message)
        self.ref = ref


def encode(frame: dict[str, Any]) -> bytes:
    return orjson.dumps(frame) + b"\n"


def pop_frame(pop: dict[str, Any]) -> bytes:
    """The `pop` frame the hub sends for an accepted pop, built once for every listener."""
    # `+ b"\n"`, not OPT_APPEND_NEWLINE: the option's bytes keep orjson's larger buffer, and a
    # flood of 20,000 pending 1 KB pops grew the hub by 15.5 MB instead of 11 (test_chaos)
    return orjson.dumps({"op": "pop", "pop": pop}) + b"\n"


def change_frame(change: dict[str, Any]) -> bytes:
    """The `change` frame (protocol 2) the hub sends about a contact a listener was popped for."""
    return orjson.dumps({"op": "change", "change": change}) + b"\n"


def is_change_frame(frame: bytes) -> bool:
    return frame.startswith(CHANGE_HEAD)


def pop_too_large(frame: bytes, max_frame: int) -> str | None:
    """Why a pop cannot be accepted: its frame would be over the `max_frame` the hub announces
    (listeners may refuse longer frames), or None when it fits."""
    size = len(frame) - 1
    if size <= max_frame:
        return None
    return (
        f"the pop would be a frame of {size} bytes, over the hub's max_frame of {max_frame} "
        "bytes: send less contact_data"
    )


ACK_HEAD = b'{"op":"ack","ids":['
ACK_TAIL = b"]}\n"


def ack_frames(ids: list[str], max_frame: int = MAX_FRAME) -> list[bytes]:
    """`ack` frames for `ids`, as few as fit, none longer than `max_frame` (newline excluded).

    The hub closes a connection whose frame is over its limit, and none of that frame's acks
    would count: a big burst of pops handled in one loop iteration must not become one frame.
    """
    frames: list[bytes] = []
    room = max_frame - (len(ACK_HEAD) + len(ACK_TAIL) - 1)
    parts: list[bytes] = []
    used = 0
    for pop_id in ids:
        part = orjson.dumps(pop_id)
        if len(part) > room:
            continue  # an id no frame can carry was never one the hub sent (its ids fit)
        if parts and used + 1 + len(part) > room:
            frames.append(ACK_HEAD + b",".join(parts) + ACK_TAIL)
            parts, used = [], 0
        used += len(part) + (1 if parts else 0)
        parts.append(part)
    if parts:
        frames.append(ACK_HEAD + b",".join(parts) + ACK_TAIL)
    return frames


def error_frame(code: Error, message: str, ref: Any = None, fatal: bool = False) -> bytes:
    frame: dict[str, Any] = {"op": "error", "code": code.value, "message": message}
    if ref is not None:
        frame["ref"] = ref
    if fatal:
        frame["fatal"] = True
    return encode(frame)


class FrameDecoder:
    """Splits a byte stream into frames; bounded memory whatever the peer sends."""

    __slots__ = ("_buffer", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Frames completed by `data`. Raises FrameError on the first bad one (the rest is moot)."""
        buffer = self._buffer
        if not buffer and data[-1:] == b"\n" and len(data) <= self.max_frame:
            # the usual read: whole frames only (an ack, a publish), nothing held from before;
            # split as it came, no copy through the buffer
            return [decode_line(line) for line in data.split(b"\n") if line.strip()]
        buffer += data
        if b"\n" not in data:
            if len(buffer) > self.max_frame:
                buffer.clear()
                raise FrameError(
                    Error.SCREENPOP_Framework_Error,
                    f"frame longer than {self.max_frame} bytes",
                )
            return []
        *lines, rest = bytes(buffer).split(b"\n")
        buffer.clear()
        buffer += rest
        frames = []
        for line in lines:
            if len(line) > self.max_frame:
                raise FrameError(
                    Error.SCREENPOP_Framework_Error, f"frame longer than {self.max_frame} bytes"
                )
            if not line.strip():
                continue  # blank lines are keep-alives for humans typing with nc
            frames.append(decode_line(line))
        if len(buffer) > self.max_frame:
            buffer.clear()
            raise FrameError(
                Error.SCREENPOP_Framework_Error, f"frame longer than {self.max_frame} bytes"
            )
        return frames


def decode_line(line: bytes) -> dict[str, Any]:
    try:
        frame = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        if too_deep_for_parser(exc):
            raise FrameError(
                Error.SCREENPOP_Framework_Error, f"frame nested deeper than {MAX_DEPTH} levels"
            ) from None
        raise FrameError(
            Error.SCREENPOP_Framework_Error, f"frame is not valid JSON: {exc}"
        ) from None
    if not isinstance(frame, dict):
        raise FrameError(Error.SCREENPOP_Framework_Error, "frame is not a JSON object")
    op = frame.get("op")
    if not isinstance(op, str):
        raise FrameError(Error.SCREENPOP_Framework_Error, "frame has no string 'op'")
    # counting brackets is cheap; only a frame with many is walked
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and nested_deeper(frame, MAX_DEPTH):
        raise FrameError(
            Error.SCREENPOP_Framework_Error, f"frame nested deeper than {MAX_DEPTH} levels"
        )
    return frame


def too_deep_for_parser(exc: ValueError) -> bool:
    """orjson ≥ 3.9 refuses deep nesting itself ("depth limit exceeded"); older ones parse it and
    leave it to `nested_deeper`. Either way the peer hears the same error."""
    return "depth limit" in str(exc) or "recursion" in str(exc).lower()


def shown(value: Any, limit: int = 64) -> str:
    """A refused value as an error message names it: a short repr, never the whole input."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("…" if len(value) > limit else "")
    return f"<{type(value).__name__}>"


def nested_deeper(value: Any, limit: int) -> bool:
    """True when arrays/objects in `value` nest deeper than `limit` (orjson parses any depth,
    but repr() and orjson.dumps() of what we echo back do not)."""
    # level by level, only containers kept: a 100-pop body is ~1,500 strings and 200 containers
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 1
    while level:
        if depth > limit:
            return True
        below = []
        for item in level:
            for child in item.values() if isinstance(item, dict) else item:
                if isinstance(child, (dict, list)):
                    below.append(child)
        level = below
        depth += 1
    return False


def check_client_frame(frame: dict[str, Any]) -> dict[str, Any]:
    """Validate a frame a client sent to the hub; raise FrameError naming what is wrong."""
    op = frame["op"]
    ref = frame.get("ref")
    if op not in CLIENT_OPS:
        if op in HUB_OPS:
            raise FrameError(Error.SCREENPOP_Framework_Error, f"only the hub may send {op!r}", ref)
        raise FrameError(Error.SCREENPOP_Framework_Error, f"unknown op {shown(op)}", ref)
    if op in ("register", "unregister"):
        media = frame.get("media", "")
        try:
            frame["media"] = Media.parse(
                media if isinstance(media, str) and len(media) <= 64 else ""
            ).value
        except ScreenPopError:
            raise FrameError(
                Error.SCREENPOP_Cannot_Register,
                f"unknown media {shown(media)} (expected one of telephone, callback, email, webcollab)",
                ref,
            ) from None
        try:
            frame["resource"] = validate_resource(frame.get("resource"))
        except ScreenPopError as exc:
            raise FrameError(exc.code, exc.message, ref) from None
    elif op == "ack":
        ids = frame.get("ids", [frame.get("id")] if "id" in frame else None)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise FrameError(
                Error.SCREENPOP_Framework_Error, "ack needs 'id' or 'ids' strings", ref
            )
        frame["ids"] = ids
    elif op in ("contact", "open_contacts"):
        origin = frame.get("origin")
        if (origin is not None or op == "open_contacts") and not (
            isinstance(origin, str)
            and 0 < len(origin) <= MAX_ORIGIN
            and not any(c < " " or "\x7f" <= c <= "\x9f" for c in origin)
        ):
            raise FrameError(
                Error.SCREENPOP_Framework_Error,
                f"{op} needs 'origin': the source's name, 1 to {MAX_ORIGIN} characters",
                ref,
            )
    elif op == "hello":
        version = frame.get("version")
        if version is None:
            raise FrameError(
                Error.SCREENPOP_Initialization_Error, "hello needs a version (1 or 2)", ref
            )
        if version.__class__ is not int or version not in VERSIONS:  # not 1.0, true or "2"
            raise FrameError(
                Error.SCREENPOP_Initialization_Error,
                f"protocol version {version if version.__class__ is int else shown(version)}"
                " not supported (hub speaks 1 and 2)",
                ref,
            )
    return frame
