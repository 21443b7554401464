"""Browsers on the hub's HTTP port: a signed session cookie, a Server-Sent Events stream of pops and
contact changes, acks as small POSTs, spop.js and the agent panel as static files.

Why SSE and not a WebSocket: a pop only flows hub → browser; acks are rare and fit a POST. An
`EventSource` reconnects by itself and sends `Last-Event-ID`, it is plain HTTP (proxies, load
balancers and TLS terminators pass it as is), and its cookie rides the same-site rules the
session relies on. See docs/browser.md.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import math
import os
import secrets
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from ..model import Media, ScreenPopError, validate_resource
from .connection import HubConnection, slow_limit
from .http import HUB_KEY

if TYPE_CHECKING:
    from .delivery import Pending
    from .routing import Key
    from .server import Hub

COOKIE = "spop_session"
CSRF_HEADER = "X-Spop-CSRF"
GONE_CHECK = 1.0  # seconds between looks at an idle stream's connection
ACK_IDS_MAX = 10_000  # ids in one ack request
CHECKED_MAX = 10_000  # sessions remembered as checked (a hub's browsers, with room to spare)
RETRY_MS = 1000  # how soon an EventSource comes back after a drop (the `retry:` field)
STATIC = {  # path → (file in spop_cli/web, content type)
    "/spop.js": ("spop.js", "text/javascript; charset=utf-8"),
    "/panel": ("panel.html", "text/html; charset=utf-8"),
    "/panel/panel.js": ("panel.js", "text/javascript; charset=utf-8"),
    "/panel/panel.css": ("panel.css", "text/css; charset=utf-8"),
}
_ids = itertools.count(1)


# -- the session ---------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hub_secret(journal: str | None) -> bytes:
    """The per-hub key sessions are signed with. Kept beside the journal (mode 0600), so a
    restarted hub still knows its browsers' sessions; without a journal, one per process."""
    if not journal:
        return secrets.token_bytes(32)
    path = Path(journal).with_name(Path(journal).name + ".browser-key")
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    data = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return data


class Sessions:
    """Sign and check session cookies. The key mixes the hub's secret with its tokens, so
    changing a token ends every session opened with the old one."""

    def __init__(self, secret: bytes, tokens: tuple[str | None, ...], ttl: float) -> None:
        material = b"\0".join((t or "").encode() for t in tokens)
        self.key = hmac.new(secret, b"spop browser session\0" + material, hashlib.sha256).digest()
        self.ttl = ttl
        # cookies already checked, and CSRF tokens already signed: every ack POST shows both,
        # and decoding and signing them again was a tenth of an ack's cost in the hub
        self._checked: dict[str, dict[str, Any]] = {}
        self._csrf: dict[str, str] = {}

    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self.key, payload, hashlib.sha256).digest())

    def issue(self, rights: str) -> tuple[str, dict[str, Any]]:
        session = {
            "sid": secrets.token_hex(12),
            "exp": math.ceil(time.time() + self.ttl),
            "rights": rights,
        }
        payload = orjson.dumps(session)
        return f"{_b64(payload)}.{self._sign(payload)}", session

    def check(self, cookie: str | None) -> dict[str, Any] | None:
        """The session a cookie holds, or None: unsigned, tampered with, or expired."""
        if not cookie or "." not in cookie:
            return None
        known = self._checked.get(cookie)
        if known is not None:
            if known["exp"] > time.time():
                return known
            del self._checked[cookie]
            return None
        body, _, sig = cookie.partition(".")
        try:
            payload = _unb64(body)
        except ValueError:
            return None
        if not hmac.compare_digest(sig, self._sign(payload)):
            return None
        session = orjson.loads(payload)
        if not isinstance(session.get("exp"), int | float) or session["exp"] <= time.time():
            return None
        if len(self._checked) >= CHECKED_MAX:
            self._checked.clear()
        self._checked[cookie] = session
        return session

    def csrf(self, session: dict[str, Any]) -> str:
        """The token a page sends back in `X-Spop-CSRF`: another origin cannot read it."""
        sid = session["sid"]
        token = self._csrf.get(sid)
        if token is None:
            if len(self._csrf) >= CHECKED_MAX:
                self._csrf.clear()
            token = self._csrf[sid] = self._sign(b"csrf\0" + sid.encode())
        return token


# -- the stream ----------------------------------------------------------------------------
def sse_event(frame: bytes) -> bytes | None:
    """A listener frame as one SSE event named by its op (`pop`, `change`, any later op with a
    body carrying an `id`); None for frames a browser has no use for (ok, welcome, pong)."""
    try:
        decoded = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    op = decoded.get("op") if isinstance(decoded, dict) else None
    body = decoded.get(op) if isinstance(op, str) else None
    if not isinstance(body, dict) or "id" not in body:
        return None
    return b"event: %s\nid: %s\ndata: %s\n\n" % (
        op.encode(),
        str(body["id"]).replace("\n", " ").encode(),
        orjson.dumps(body),
    )


class BrowserStream(HubConnection):
    """A delivery subscriber like a listener connection (same window, same replay, same acks),
    whose frames leave as SSE events on an HTTP response instead of lines on a socket.

    Its events go out like a listener connection's frames: queued, then written once per loop
    iteration by the hub's flush, straight to the response's transport as one HTTP chunk. No
    task wakes per event and no trip through aiohttp's writer: at 1,000 pops/s on 1,000
    streams those were most of the hub's per-event cost. The stream's handler only waits for
    the end."""

    def __init__(self, hub: Hub, peer: str) -> None:
        super().__init__(hub)
        self.peer = peer
        self.role = "browser"
        self.updates = True  # contact-update frames (protocol 2) are forwarded as `change` events
        self.id = f"b{next(_ids)}"
        self.waiter: asyncio.Future[None] | None = None  # the handler, waiting for the end
        self.chunked = True  # HTTP/1.1: each write is one chunk (HTTP/1.0: raw until close)
        self.expires = float("inf")  # when its session ends (time.time()): the stream ends too

    def _send(self, pending: Pending) -> None:
        """A pop or change from delivery: its SSE event is built once, for every stream."""
        event = pending.sse
        if event is None:
            event = pending.sse = sse_event(pending.frame) or b""
        self._in_flight(pending)
        if event:
            HubConnection.write(self, event)

    def write(self, data: bytes) -> None:
        """Any other frame written to it: an event when it carries an id, else dropped."""
        if self.closed:
            return
        event = sse_event(data)
        if event is not None:
            HubConnection.write(self, event)

    def flush(self) -> None:
        """Everything queued this iteration, as one chunk in one write; a browser that stopped
        reading past `max_buffer` per key (slow_limit) is dropped (its pops stay pending for its
        return)."""
        transport, out = self.transport, self.out
        if not out or transport is None:  # before the response head is out: kept for later
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self.closed:
            return
        if transport.is_closing():
            self.close()
            return
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        transport.write(data)
        self.last_tx = time.monotonic()
        unsent, max_buffer = transport.get_write_buffer_size(), self.hub.config.max_buffer
        if unsent > max_buffer and unsent > slow_limit(max_buffer, len(self.keys)):
            self.hub.counters["slow_consumers_dropped"] += 1
            self.hub.log.warning("%s: slow browser stream, buffer over limit: closed", self.peer)
            self.close()
            transport.abort()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def ended(self) -> None:
        """Wait until the stream is closed. A bare future, no timer: the hub-wide sweep
        (`_sweep_streams`) sends heartbeats and finds closed tabs."""
        while not self.closed:
            waiter = self.waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self.waiter = None

    def close(self) -> None:
        self.closed = True
        self.wake()

    def detach(self) -> None:
        """The response ended: unregister, so its pops wait for the next stream."""
        self.closed = True
        self.out.clear()
        for key in self.keys:
            self.hub.delivery.unsubscribe(key, self)
        self.keys.clear()
        self.inflight.clear()
        self.live.clear()
        self.backlog.clear()


async def _sweep_streams(hub: Hub) -> None:
    """Once per interval, over every stream: close those whose browser left (aiohttp does not
    cancel their handler, so a closed tab would otherwise stay registered until a write fails),
    and send a heartbeat to those idle for `heartbeat` seconds. One task for all streams: a
    timer per stream would cost a wake-up per stream per interval."""
    heartbeat = hub.config.heartbeat
    interval = min(GONE_CHECK, heartbeat / 2)
    while True:
        await asyncio.sleep(interval)
        now, wall = time.monotonic(), time.time()
        for stream in list(hub.browser_streams):
            transport = stream.transport
            if transport is None or transport.is_closing() or wall >= stream.expires:
                stream.close()  # gone, or its session over: a reconnect must sign in again
            elif now - stream.last_tx >= heartbeat and not stream.out:
                # an event, not a comment line: a comment never reaches the page's script,
                # and spop.js drops a stream silent for three heartbeats
                HubConnection.write(stream, b"event: ping\ndata: %d\n\n" % int(time.time()))


async def sweeping(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: the sweep runs while the HTTP port is up."""
    task = asyncio.get_running_loop().create_task(_sweep_streams(_hub_of_app(app)))
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


# -- helpers -------------------------------------------------------------------------------
def _hub(request: web.Request) -> Hub:
    return _hub_of_app(request.app)


def _cookie(request: web.Request) -> str | None:
    """The session cookie's value, read off the Cookie header without parsing every cookie
    into a jar (aiohttp's `request.cookies` did that on every ack)."""
    header = request.headers.get("Cookie")
    if not header:
        return None
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value.strip('"')
    return None


def _problem(status: int, error: str, message: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": error, "message": message}),
        status=status,
        content_type="application/json",
    )


def _own_origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def origin_allowed(request: web.Request) -> bool:
    """No Origin (not a cross-origin browser request), the hub's own, or one in browser_origins."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin == _own_origin(request) or origin in _hub(request).config.browser_origins


def _cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin and origin != _own_origin(request) and origin in _hub(request).config.browser_origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
    response.headers["Vary"] = "Origin"
    return response


def _foreign(request: web.Request) -> web.Response:
    """The refusal of another origin, counted, naming it (every endpoint, preflights too)."""
    _hub(request).counters["browser_refused"] += 1
    origin = request.headers.get("Origin", "")
    return _problem(403, "cross_origin", f"origin {origin[:100]!r} is not in browser_origins")


def _guard(request: web.Request, csrf: bool) -> tuple[dict[str, Any] | None, web.Response | None]:
    """The session, or the refusal: another origin (403), no session (401), no CSRF token (403)."""
    hub = _hub(request)
    if not origin_allowed(request):
        return None, _foreign(request)
    session = hub.browser_sessions.check(_cookie(request))
    if session is None:
        return None, _problem(401, "unauthorized", "no valid session: sign in first")
    if csrf and not hmac.compare_digest(
        request.headers.get(CSRF_HEADER, ""), hub.browser_sessions.csrf(session)
    ):
        hub.counters["browser_refused"] += 1
        return None, _problem(403, "csrf", f"missing or wrong {CSRF_HEADER} header")
    return session, None


def _json(request: web.Request, body: Any, status: int = 200) -> web.StreamResponse:
    response = web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    return _cors(request, response)


async def _json_body(request: web.Request) -> Any:
    """A small JSON body; JSON only, so a cross-origin form cannot post it without a preflight."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text="send application/json")
    raw = await request.content.read(64 * 1024 + 1)
    if len(raw) > 64 * 1024:
        raise web.HTTPRequestEntityTooLarge(max_size=64 * 1024, actual_size=len(raw))
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(text="body is not valid JSON") from None


_known_keys: dict[tuple[Any, Any], list[Key]] = {}  # an ack's (media, resource) seen before


def _keys(query: Any) -> list[Key]:
    """(media, resource) pairs from a query or body: one or more media × one or more resources."""
    medias = query.getall("media", []) if hasattr(query, "getall") else query.get("media", [])
    resources_ = (
        query.getall("resource", []) if hasattr(query, "getall") else query.get("resource", [])
    )
    medias = [medias] if isinstance(medias, str) else medias
    resources_ = [resources_] if isinstance(resources_, str) else resources_
    try:  # every ack of a page names the same pairs: checked once
        seen = (tuple(medias), tuple(resources_))
        known = _known_keys.get(seen)
    except TypeError:  # not hashable (a list inside): checked below, refused there
        seen, known = None, None
    if known is not None:
        return known
    keys = _checked_keys(medias, resources_)
    if seen is not None:
        if len(_known_keys) >= CHECKED_MAX:
            _known_keys.clear()
        _known_keys[seen] = keys
    return keys


def _checked_keys(medias: Any, resources_: Any) -> list[Key]:
    if not medias or not resources_:
        raise ValueError("name a media and at least one resource")
    keys: list[Key] = []
    for media in medias:
        if not isinstance(media, str):
            raise ValueError("media must be a string")
        try:
            word = Media.parse(media).value
        except ScreenPopError as exc:
            raise ValueError(exc.message) from None
        for resource in resources_:
            try:  # the one resource rule of both ports (docs/protocol.md)
                keys.append((word, validate_resource(resource)))
            except ScreenPopError as exc:
                raise ValueError(exc.message) from None
    return list(dict.fromkeys(keys))


# -- handlers ------------------------------------------------------------------------------
async def post_session(request: web.Request) -> web.StreamResponse:
    """Sign in: the listener token in the body, a signed HttpOnly cookie back."""
    hub = _hub(request)
    if not origin_allowed(request):
        return _foreign(request)
    body = await _json_body(request)
    token = body.get("token") if isinstance(body, dict) else None
    rights = hub.authorize(token)
    if rights is None:
        hub.counters["auth_failures"] += 1
        return _cors(request, _problem(401, "unauthorized", "wrong or missing token"))
    cookie, session = hub.browser_sessions.issue(rights)
    response = _json(request, _session_body(hub, session))
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(hub.browser_sessions.ttl),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=bool(hub.config.tls_cert),
    )
    return response


def _session_body(hub: Hub, session: dict[str, Any]) -> dict[str, Any]:
    from .connection import seconds

    return {
        "csrf": hub.browser_sessions.csrf(session),
        "expires": session["exp"],
        "heartbeat": seconds(hub.config.heartbeat),
        "pop_ttl": seconds(hub.config.pop_ttl),
        "buttons": hub.config.panel_buttons,
    }


async def get_session(request: web.Request) -> web.StreamResponse:
    """The session's CSRF token and panel settings (a reloaded page asks again)."""
    session, refused = _guard(request, csrf=False)
    if refused is not None:
        return _cors(request, refused)
    return _json(request, _session_body(_hub(request), session))  # type: ignore[arg-type]


async def delete_session(request: web.Request) -> web.StreamResponse:
    """Sign out: the cookie is cleared (a stolen copy stays valid until it expires)."""
    _, refused = _guard(request, csrf=True)
    if refused is not None:
        return _cors(request, refused)
    response = _json(request, {"signed_out": True})
    response.del_cookie(COOKIE, path="/")
    return response


async def post_ack(request: web.Request) -> web.StreamResponse:
    """`{"media", "resource", "ids"}`: the pops (or changes) were handled by this page."""
    hub = _hub(request)
    _, refused = _guard(request, csrf=True)
    if refused is not None:
        return _cors(request, refused)
    body = await _json_body(request)
    ids = body.get("ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return _cors(request, _problem(400, "invalid_ack", "ids must be a list of strings"))
    if len(ids) > ACK_IDS_MAX:
        return _cors(
            request, _problem(400, "invalid_ack", f"at most {ACK_IDS_MAX:,} ids per request")
        )
    try:
        keys = set(_keys(body))
    except ValueError as exc:
        return _cors(request, _problem(400, "invalid_key", str(exc)))
    acked = 0
    for pop_id in ids:
        acked += hub.ack(pop_id, keys)  # pops and contact changes alike
    return _json(request, {"acked": acked})


async def get_stream(request: web.Request) -> web.StreamResponse:
    """The SSE stream of one or more (media, resource) pairs."""
    hub = _hub(request)
    session, refused = _guard(request, csrf=False)
    if refused is not None or session is None:
        return _cors(request, refused or _problem(401, "unauthorized", "sign in first"))
    try:
        keys = _keys(request.query)
    except ValueError as exc:
        return _cors(request, _problem(400, "invalid_key", str(exc)))
    if len(keys) > hub.config.max_registrations:
        return _cors(request, _problem(400, "invalid_key", "too many registrations on one stream"))
    peer = request.remote or "?"
    stream = BrowserStream(hub, f"browser {peer}")
    stream.expires = float(session["exp"])
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # nginx: pass events on at once
        }
    )
    _cors(request, response)
    await response.prepare(request)
    last = request.headers.get("Last-Event-ID") or request.query.get("last_event_id", "")
    hub.counters["browser_streams_opened"] += 1
    hello = {"stream": stream.id, "keys": [list(k) for k in keys], "resumed_after": last[:200]}
    try:
        # the head and the first event through aiohttp; every later event straight to the
        # transport, framed as aiohttp would (chunked unless the browser spoke HTTP/1.0)
        await response.write(
            b"retry: %d\nevent: ready\ndata: %s\n\n" % (RETRY_MS, orjson.dumps(hello))
        )
        stream.chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"
        stream.transport = request.transport  # type: ignore[assignment]
        stream.last_tx = time.monotonic()
        hub.browser_streams.add(stream)  # the sweep's: heartbeats, closed tabs, session ends
        for key in keys:  # registered before the replay, like a listener's `register`
            stream.keys.add(key)
            hub.delivery.subscribe(key, stream)
        resumed = f", resumed after {last[:200]!r}" if last else ""
        hub.log.info("%s: browser stream %s for %s%s", stream.peer, stream.id, keys, resumed)
        await stream.ended()
    except ConnectionResetError:  # the browser went away; its pops wait for its return
        pass
    finally:
        stream.detach()
        hub.browser_streams.discard(stream)
    return response


async def options_browser(request: web.Request) -> web.StreamResponse:
    """CORS preflight: answered for configured origins only."""
    origin = request.headers.get("Origin")
    if not origin or origin not in _hub(request).config.browser_origins:
        return _foreign(request)
    response = web.Response(status=204)
    response.headers.update(
        {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Allow-Methods": "GET, POST, DELETE",
            "Access-Control-Allow-Headers": f"Content-Type, {CSRF_HEADER}, Last-Event-ID",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        }
    )
    return response


async def get_static(request: web.Request) -> web.StreamResponse:
    name, content_type = STATIC[request.path]
    data = resources.files("spop_cli").joinpath("web", name).read_bytes()
    response = web.Response(body=data, headers={"Content-Type": content_type})
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if name == "panel.html":
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
        )
        response.headers["X-Frame-Options"] = "DENY"
    if name == "spop.js":  # a CRM page of a configured origin may load it
        _cors(request, response)
    return response


async def close_streams(app: web.Application) -> None:
    """On shutdown: end every stream, so the hub stops without waiting for browsers."""
    hub = _hub_of_app(app)
    for stream in list(hub.browser_streams):
        stream.close()


def _hub_of_app(app: web.Application) -> Hub:
    return app[HUB_KEY]  # type: ignore[return-value]


def fast_routes() -> dict[tuple[str, str], Any]:
    """The routes below that answer in one piece, for the HTTP port's lean front (the SSE stream
    is not one of them: aiohttp serves it)."""
    routes: dict[tuple[str, str], Any] = {
        ("POST", "/v1/browser/session"): post_session,
        ("GET", "/v1/browser/session"): get_session,
        ("DELETE", "/v1/browser/session"): delete_session,
        ("POST", "/v1/browser/ack"): post_ack,
    }
    for path in ("/v1/browser/session", "/v1/browser/stream", "/v1/browser/ack"):
        routes[("OPTIONS", path)] = options_browser
    for path in STATIC:
        routes[("GET", path)] = get_static
    return routes


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/browser/session", post_session)
    app.router.add_get("/v1/browser/session", get_session)
    app.router.add_delete("/v1/browser/session", delete_session)
    app.router.add_get("/v1/browser/stream", get_stream)
    app.router.add_post("/v1/browser/ack", post_ack)
    for path in ("/v1/browser/session", "/v1/browser/stream", "/v1/browser/ack"):
        app.router.add_route("OPTIONS", path, options_browser)
    for path in STATIC:
        app.router.add_get(path, get_static)
    app.on_shutdown.append(close_streams)
    app.cleanup_ctx.append(sweeping)
