"""The hub's HTTP port, lean in front of aiohttp: the plain requests of sources and browsers
(pops, contact events, acks, sessions, health) are answered here, and the first request that is
not one of them hands its connection to aiohttp for the rest of the connection's life.

Why: aiohttp's own work per request (a task wake-up, its request and response objects, header
parsing and serialising) was 90-150 µs of hub CPU on this project's 2-core machine, more than a
pop's validation, journal commit and delivery together (benchmarks/PROFILE.md). Sources POST one
pop at a time and every browser pop costs an ack POST, so that cost was paid twice per pop.

What this front answers itself is deliberately narrow: an HTTP/1.1 request for one of the
routes it was given (a method and an exact path, no query string: ingest, acks, sessions,
health, status, the static files) whose head is plain ASCII, with at most one `Content-Length`
(required for a POST; no `Transfer-Encoding`, `Expect` or `Upgrade`), one `Host`, and the whole
body already received. Everything else (the SSE stream, webhook sources, unknown paths, HEAD,
HTTP/1.0, odd or malformed heads, a body still on its way, bodies over `max_body`) goes to aiohttp
with every byte the connection sent, so its parser, limits, timeouts and error answers are the
ones the client meets. Both run the same handlers (`http.py`, `browser.py`), so a request gets
the same answer either way; the tests run both.
"""

from __future__ import annotations

import asyncio
import re
import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

if TYPE_CHECKING:
    from collections.abc import Callable

    from .server import Hub

MAX_HEAD = 8190  # aiohttp's own limit for a request line and for each header line
PAUSE_AT = 1 << 20  # pipelined bytes buffered while a request is answered before reading pauses
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header's name
MAX_LINES = 1024  # header lines whose parse is kept (a source sends the same ones each time)
KEPT_LINE = 256  # ... each at most this long: the cache holds at most 256 KiB of lines
# the headers the front looks at itself
_LENGTH, _HOST, _CONNECTION, _AUTHORIZATION, _ELSEWHERE = 1, 2, 3, 4, 5
_KINDS = {
    "content-length": _LENGTH,
    "host": _HOST,
    "connection": _CONNECTION,
    "authorization": _AUTHORIZATION,
    "transfer-encoding": _ELSEWHERE,
    "expect": _ELSEWHERE,
    "upgrade": _ELSEWHERE,
}
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n"


def _field(line: str) -> tuple[tuple[str, str], int] | None:
    """A header line (of an ASCII head) as its (name, value) and what the front makes of it;
    None: not `token ":" OWS value OWS` with a value of visible characters and spaces (a tab only
    before it), which aiohttp then parses. The value is trimmed of the spaces around it."""
    name, colon, value = line.partition(":")
    if not colon or not (name.replace("-", "").isalnum() or _TOKEN.fullmatch(name)):
        return None
    value = value.lstrip(" \t")
    if not value.isprintable():  # the head is ASCII: printable is \x20-\x7e
        return None
    return (name, value.rstrip(" ")), _KINDS.get(name.lower(), 0)


# header line → its parse (`_field`); kept while there are at most MAX_LINES of them
_LINES: dict[str, tuple[tuple[str, str], int]] = {}


class _Date:
    """The `Date` header, formatted once a second (as aiohttp does)."""

    second = -1
    line = ""

    @classmethod
    def get(cls) -> str:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.line = f"Date: {formatdate(now, usegmt=True)}\r\n"
        return cls.line


class FastRequest:
    """What the fast routes' handlers read of a request: the same names as aiohttp's."""

    __slots__ = (
        "_headers",
        "app",
        "authorization",
        "body",
        "method",
        "pairs",
        "path",
        "scheme",
        "transport",
    )
    query: MultiDictProxy[str] = MultiDictProxy(MultiDict())  # a query string goes to aiohttp

    def __init__(
        self,
        app: web.Application,
        transport: asyncio.Transport,
        scheme: str,
        method: str,
        path: str,
        pairs: list[tuple[str, str]],
        authorization: str,
        body: bytes,
    ) -> None:
        self.app = app
        self.transport = transport
        self.scheme = scheme
        self.method = method
        self.path = path
        self.pairs = pairs  # the header fields in order, (name, value)
        self.authorization = authorization  # the first `Authorization` field's value, or ""
        self.body = body
        self._headers: CIMultiDictProxy[str] | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """Made when a handler first reads them: an ingest request reads only `authorization`."""
        if self._headers is None:
            self._headers = CIMultiDictProxy(CIMultiDict(self.pairs))
        return self._headers

    @property
    def content(self) -> FastRequest:  # the body is whole: reading it never waits
        return self

    def is_eof(self) -> bool:
        return True

    async def read(self, n: int = -1) -> bytes:
        return self.body if n < 0 else self.body[:n]

    @property
    def content_length(self) -> int:
        return len(self.body)

    @property
    def content_type(self) -> str:
        value = self.headers.get("Content-Type")
        if not value:
            return "application/octet-stream"
        return value.partition(";")[0].strip().lower()

    @property
    def host(self) -> str:
        return self.headers["Host"]

    @property
    def remote(self) -> str | None:
        peer = self.transport.get_extra_info("peername")
        return str(peer[0]) if isinstance(peer, (list, tuple)) else None


class FastHTTP(asyncio.Protocol):
    """One connection of the HTTP port, until a request it does not answer itself."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False  # a request is being answered: later ones wait in the buffer
        self.paused = False  # reading paused: too many pipelined bytes wait
        self.blocked = False  # the peer does not read its answers: none is made until it does
        self.answering: Any = None  # the handler's coroutine, resumed when its wait is over
        self.request: FastRequest | None = None  # ... its request
        self.close_after = False  # ... and whether the connection closes after it
        self.last = time.monotonic()

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy and not self.blocked:
            self._next()
        elif len(self.buffer) > PAUSE_AT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        """The answers pile up unread (the transport's buffer is over its high mark)."""
        self.blocked = True

    def resume_writing(self) -> None:
        self.blocked = False
        if not self.busy and self.transport is not None:
            self._resume()

    # -- requests -----------------------------------------------------------------------------
    def _next(self) -> None:
        """Answer the requests at the head of the buffer in turn, or hand the connection over.

        A handler runs at once, in this call, as far as its first wait: most (health, acks,
        sessions, static files) never wait and are answered without a task or another turn of
        the loop; one that waits (a pop's journal commit) is resumed by the done callback of
        what it waits for (`_step`)."""
        buffer = self.buffer
        while buffer and not self.busy and not self.blocked and self.transport is not None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._hand_over()
                return
            parsed = self._parse(buffer[:end].decode("latin-1"))
            if parsed is None:
                self._hand_over()
                return
            handler, method, path, pairs, authorization, length, close = parsed
            start = end + 4
            if len(buffer) - start < length:  # the body is still coming: aiohttp times it
                self._hand_over()
                return
            body = bytes(buffer[start : start + length])
            del buffer[: start + length]
            request = FastRequest(
                self.front.app,
                self.transport,
                self.front.scheme,
                method,
                path,
                pairs,
                authorization,
                body,
            )
            self.busy = True
            self.request = request
            self.close_after = close
            self.answering = handler(request)  # a coroutine: nothing of it has run yet
            if not self._drive():  # it waits (resumed by `_step`), or the connection closes
                return
            if self.paused:
                self.paused = False
                self.transport.resume_reading()

    def _drive(self) -> bool:
        """Run the answer as far as its next wait, or to its end and write it; True: answered,
        the connection goes on. A wait resumes it here again from the done callback of what it
        waits for, as a task would, without one: no task object, no step of its own per request
        (PROFILE.md, "Hub per-request cuts"). So a handler reached here has no current task:
        `asyncio.timeout()` would raise (http._body uses it only for a body still arriving,
        which never reaches this front)."""
        try:
            waiting = self.answering.send(None)
        except StopIteration as done:
            response = done.value
        except Exception as exc:  # the same JSON error aiohttp's path gives
            response = self.front.on_error(self.request, exc)
        except BaseException:
            self._answered()
            raise
        else:
            self.front.answering.add(self)
            if waiting is None:  # a bare yield (sleep(0)): on the next turn of the loop
                asyncio.get_running_loop().call_soon(self._step)
            else:
                waiting._asyncio_future_blocking = False  # taken over, as a task takes a yield
                waiting.add_done_callback(self._step)
            return False
        self._answered()
        return self._respond(response)

    def _step(self, _done: Any = None) -> None:
        """The answer's next step: what it awaited is done (its `await` reads the outcome, an
        error included, as under a task)."""
        if self._drive():
            self._resume()

    def _answered(self) -> None:
        self.answering = self.request = None
        self.front.answering.discard(self)

    def _parse(
        self, head: str
    ) -> tuple[Any, str, str, list[tuple[str, str]], str, int, bool] | None:
        """The head's handler, method, path, header fields, first `Authorization`, body length
        and `Connection: close`; None: not one this front answers."""
        if not head.isascii():
            return None
        line_end = head.find("\r\n")
        parts = (head[:line_end] if line_end >= 0 else head).split(" ")
        if len(parts) != 3 or parts[2] != "HTTP/1.1":
            return None
        method, path = parts[0], parts[1]
        handler = self.front.routes.get((method, path))
        if handler is None:
            return None
        pairs: list[tuple[str, str]] = []
        lengths: list[str] = []
        hosts = 0
        connection: list[str] = []
        authorization = None
        if line_end >= 0:
            lines = _LINES
            for line in head[line_end + 2 :].split("\r\n"):
                field = lines.get(line)
                if field is None:
                    field = _field(line)
                    if field is None:
                        return None
                    if len(line) <= KEPT_LINE:
                        if len(lines) >= MAX_LINES:
                            lines.clear()
                        lines[line] = field
                pair, kind = field
                pairs.append(pair)
                if kind:
                    if kind == _LENGTH:
                        lengths.append(pair[1])
                    elif kind == _HOST:
                        hosts += 1
                    elif kind == _CONNECTION:
                        connection.append(pair[1])
                    elif kind == _AUTHORIZATION:
                        if authorization is None:
                            authorization = pair[1]
                    else:  # Transfer-Encoding, Expect, Upgrade: aiohttp's
                        return None
        if not lengths and method != "POST":
            lengths.append("0")
        if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 12 or hosts != 1:
            return None
        length = int(lengths[0])
        if length > self.front.max_body:
            return None
        close = False
        if connection:
            if len(connection) != 1 or connection[0].lower() not in ("close", "keep-alive"):
                return None
            close = connection[0].lower() == "close"
        return handler, method, path, pairs, authorization or "", length, close

    def _respond(self, response: Any) -> bool:
        """Write the handler's answer; True: go on with the next request."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        close = self.close_after
        if response.__class__ is JsonAnswer:
            transport.write(response.serialise(close))
        else:
            close = close or getattr(response, "_keep_alive", None) is False
            transport.write(_serialise(response, close))
        self.last = time.monotonic()
        self.busy = False
        if close:
            transport.close()
            return False
        return True

    def _resume(self) -> None:
        """Go on with the pipelined requests, reading again if it had paused."""
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self._next()

    def _hand_over(self) -> None:
        """From here on aiohttp serves this connection, starting from the bytes not yet answered."""
        transport = self.transport
        if transport is None:
            return
        self.front.connections.discard(self)
        if self.paused:
            self.paused = False
            transport.resume_reading()
        handler = self.front.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data, self.buffer = bytes(self.buffer), bytearray()
        self.transport = None
        if data:
            handler.data_received(data)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.busy else now - self.last


_OWN = frozenset(  # headers the front writes itself (handlers never set them)
    ("Content-Length", "content-length", "Connection", "connection", "Date", "date")
    + ("Server", "server")
)


def _serialise(response: web.StreamResponse, close: bool) -> bytes:
    """The response as aiohttp would write it for an HTTP/1.1 request."""
    body = response.body if isinstance(response, web.Response) else b""  # type: ignore[union-attr]
    body = body if isinstance(body, bytes) else b""
    status = response.status
    lines = [f"HTTP/1.1 {status} {response.reason}\r\n"]
    headers = response.headers
    for name, value in headers.items():
        if name not in _OWN:
            lines.append(f"{name}: {value}\r\n")
    cookies = response._cookies  # the jar aiohttp itself reads (set_cookie, del_cookie)
    if cookies:
        for cookie in cookies.values():
            lines.append(f"Set-Cookie: {cookie.output(header='')[1:]}\r\n")
    if status in (204, 304) or status < 200:
        body = b""
    else:
        if body and "Content-Type" not in headers:
            lines.append("Content-Type: application/octet-stream\r\n")
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append(_Date.get())
    lines.append(_SERVER)
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1") + body


class JsonAnswer:
    """A JSON answer to a request of the front's, written as `_serialise` writes the
    `web.Response(body=body, status=status, content_type="application/json")` aiohttp's path
    gets, byte for byte, without building that object and its headers per request: the status
    line and `Content-Type` come from serialising one such response per status (tested)."""

    __slots__ = ("body", "status")
    _heads: dict[int, str] = {}

    def __init__(self, body: bytes, status: int = 200) -> None:
        self.body = body
        self.status = status

    @classmethod
    def takes(cls, status: int) -> bool:
        """Statuses answered with a body and a `Content-Length` (not 1xx, 204, 304)."""
        return status >= 200 and status not in (204, 304)

    def serialise(self, close: bool) -> bytes:
        head = self._heads.get(self.status)
        if head is None:
            model = _serialise(
                web.Response(body=b"", status=self.status, content_type="application/json"), False
            ).decode("latin-1")
            head = self._heads[self.status] = model[: model.index("Content-Length: ")]
        body = self.body
        end = "Connection: close\r\n\r\n" if close else "\r\n"
        return f"{head}Content-Length: {len(body)}\r\n{_Date.get()}{_SERVER}{end}".encode() + body


class Front:
    """The listening socket of the HTTP port and its lean connections."""

    def __init__(
        self,
        hub: Hub,
        app: web.Application,
        server: Any,
        routes: dict[str, Any],
        on_error: Callable[[Any, Exception], web.StreamResponse],
        tls: bool,
    ) -> None:
        self.hub = hub
        self.app = app
        self.server = server  # aiohttp's protocol factory: what a connection is handed to
        self.routes = routes
        self.on_error = on_error
        self.scheme = "https" if tls else "http"
        self.max_body = hub.config.max_body
        self.connections: set[FastHTTP] = set()
        self.answering: set[FastHTTP] = set()  # connections whose answer waits (a commit)
        self._listener: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, ssl_context: Any) -> int:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: FastHTTP(self), host, port, ssl=ssl_context, reuse_address=True, backlog=128
        )
        self._sweeper = loop.create_task(self._sweep())
        return int(self._listener.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Close lean connections idle past `http_idle_timeout` (aiohttp's keep-alive timeout:
        a connection that never completes a request head is closed the same way)."""
        limit = self.hub.config.http_idle_timeout
        while True:
            await asyncio.sleep(min(1.0, limit / 2))
            now = time.monotonic()
            for conn in [c for c in self.connections if c.idle_for(now) > limit]:
                if conn.transport is not None:
                    conn.transport.close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._listener is not None:
            self._listener.close()
        for conn in list(self.connections):
            if conn.transport is not None and not conn.busy:
                conn.transport.close()
        deadline = time.monotonic() + 5
        while self.answering and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # answers already on their way finish (their commit)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()

    async def wait_closed(self) -> None:
        """After aiohttp closed the connections handed to it (some Pythons wait for those)."""
        if self._listener is not None:
            try:
                await asyncio.wait_for(self._listener.wait_closed(), 5)
            except TimeoutError:
                pass
            self._listener = None
