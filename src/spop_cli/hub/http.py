"""The hub's HTTP port: ingest (`/v1/pops`, `/v1/contacts`), status, health, OpenAPI."""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import hdrs, web

from .. import __version__
from ..pops import InputError
from ..protocol import MAX_DEPTH, nested_deeper, shown, too_deep_for_parser
from .contacts import ContactEventError
from .fasthttp import FastRequest, JsonAnswer

if TYPE_CHECKING:
    from .server import Hub

HUB_KEY = web.AppKey("hub", object)


def _json(body: Any, status: int = 200, request: Any = None) -> web.Response:
    """`request`: the answer's request; the front's (fasthttp.py) gets a JsonAnswer, the same
    bytes on the wire without an aiohttp Response built per request."""
    if request.__class__ is FastRequest and JsonAnswer.takes(status):
        return JsonAnswer(orjson.dumps(body), status)  # type: ignore[return-value]
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _problem(status: int, error: str, message: str, **extra: Any) -> web.Response:
    return _json({"error": error, "message": message, **extra}, status)


def _refusal(body: Any, status: int, retry_after: int | None = None) -> web.Response:
    """A refused request; a 503 (the journal cannot be written) says when to try again, and after a
    408 the rest of its body is not awaited: the connection closes."""
    response = _json(body, status)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    if status == 408:
        response.force_close()
    return response


def _bearer(request: web.Request) -> str | None:
    if request.__class__ is FastRequest:  # found by its parser: no headers object made
        header = request.authorization  # type: ignore[attr-defined]
    else:
        header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _rights(request: web.Request) -> str | None:
    hub: Hub = request.app[HUB_KEY]  # type: ignore[assignment]
    return hub.authorize(_bearer(request))


async def _body(request: web.Request, hub: Hub, check_depth: bool = True) -> Any:
    """The request's JSON body, bounded in size and time. `check_depth=False`: the caller checks
    the nesting itself, only when it refuses the body (a valid pop is never nested deeply)."""
    limit = hub.config.max_body
    if request.content_length is not None and request.content_length > limit:
        raise InputError(
            413, "too_large", f"body of {request.content_length} bytes over the {limit} limit"
        )
    try:
        if request.content.is_eof():
            # the whole body came with the head (the usual small request): read() cannot wait
            raw = await request.read()
        else:
            # aiohttp bounds the wait for a request head (keepalive_timeout), not for its body:
            # a body dribbled a byte a second would hold the connection (and a descriptor) forever
            async with asyncio.timeout(hub.config.http_body_timeout):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise InputError(413, "too_large", f"body over the {limit} byte limit") from None
    except TimeoutError:
        raise InputError(
            408, "timeout", f"body not received within {hub.config.http_body_timeout:g} s"
        ) from None
    return _loads(raw, check_depth)


def _loads(raw: bytes, check_depth: bool) -> Any:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if too_deep_for_parser(exc):
            raise InputError(
                400, "too_deep", f"body nested deeper than {MAX_DEPTH} levels"
            ) from None
        raise InputError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
    if check_depth:
        _check_depth(raw, body)
    return body


def _check_depth(raw: bytes, body: Any) -> None:
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and nested_deeper(body, MAX_DEPTH):
        raise InputError(400, "too_deep", f"body nested deeper than {MAX_DEPTH} levels")


def _source_guard(request: web.Request, hub: Hub) -> web.Response | None:
    rights = hub.authorize(_bearer(request))
    if rights == "source":
        return None
    if rights == "listener" and hub.config.token is not None:  # the listeners' token
        return _problem(403, "forbidden", "this token may listen but not publish")
    # nothing, or a wrong token: also where listening is open (only a source_token is set)
    return _problem(401, "unauthorized", "wrong or missing bearer token")


async def post_pops(request: web.Request) -> web.Response:
    return await ingest_pops(request, request.app[HUB_KEY])  # type: ignore[arg-type]


async def ingest_pops(request: web.Request, hub: Hub) -> web.Response:
    """`POST /v1/pops`: checked, journalled, answered once committed."""
    denied = _source_guard(request, hub)
    if denied is not None:
        return denied
    body: Any = None
    try:
        if request.__class__ is FastRequest:
            body = _loads(request.body, False)  # type: ignore[attr-defined]
            # the front never cancels an answer it drives (fasthttp.py): the batch's commit,
            # shared by its sources, is awaited as it is, with no shield around it per request
            ids, commit = hub.publish_now(body)
            if commit is not None:
                await commit
        else:
            body = await _body(request, hub, check_depth=False)
            ids = await hub.publish(body)
    except InputError as exc:
        if body is not None and exc.status != 503:  # refused: a body too deep says so first
            try:
                _check_depth(await request.read(), body)
            except InputError as deep:
                exc = deep
        hub.counters["rejected"] += 1
        return _refusal(exc.to_dict(), exc.status, getattr(exc, "retry_after", None))
    return _json({"accepted": len(ids), "ids": ids}, 200, request)


async def post_contacts(request: web.Request) -> web.Response:
    return await ingest_contacts(request, request.app[HUB_KEY])  # type: ignore[arg-type]


async def ingest_contacts(request: web.Request, hub: Hub) -> web.Response:
    """`POST /v1/contacts`: events applied in order, the journal committed, then answered."""
    denied = _source_guard(request, hub)
    if denied is not None:
        return denied
    try:
        if request.__class__ is FastRequest:  # the body is whole: nothing to wait for
            body = _loads(request.body, True)  # type: ignore[attr-defined]
            # the front never cancels an answer it drives: no shield around the shared commit
            result = await hub.apply_contacts(body, shield=False)
        else:
            result = await hub.apply_contacts(await _body(request, hub))
    except InputError as exc:
        hub.counters["rejected"] += 1
        # the same body as a refused event: nothing was applied
        refused = {"field": None, "index": None, **exc.to_dict(), "applied": 0, "pops": []}
        return _refusal(refused, exc.status, getattr(exc, "retry_after", None))
    except ContactEventError as exc:
        hub.counters["rejected"] += 1
        applied = getattr(exc, "applied_result", {"applied": 0, "pops": []})
        return _json({**exc.to_dict(), **applied}, exc.status)
    return _json(result, 200, request)


async def get_status(request: web.Request) -> web.Response:
    hub: Hub = request.app[HUB_KEY]  # type: ignore[assignment]
    if _rights(request) is None:
        return _problem(401, "unauthorized", "wrong or missing bearer token")
    return _json(hub.status())


async def get_health(request: web.Request) -> web.Response:
    # not hub.status(): it walks every registration, too much for a probe every few seconds
    hub: Hub = request.app[HUB_KEY]  # type: ignore[assignment]
    reason = hub.unavailable()
    if reason is not None:  # a NATS hub cut off from NATS: the balancer's check sends elsewhere
        body = {"status": "unavailable", "version": __version__, "reason": reason}
        return _json(body, 503, request)
    return _json({"status": "ok", "version": __version__}, 200, request)


async def get_openapi(request: web.Request) -> web.Response:
    text = resources.files("spop_cli").joinpath("openapi.json").read_bytes()
    return web.Response(body=text, content_type="application/json")


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error, routing ones included, as a JSON body."""
    try:
        return await handler(request)
    except Exception as exc:
        return _error_response(request, request.app[HUB_KEY], exc)  # type: ignore[arg-type]


def _error_response(request: web.Request, hub: Hub, exc: Exception) -> web.Response:
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        message = exc.text or exc.reason
        if exc.status == 404:
            message = f"no such path {shown(request.path)}"
        elif exc.status == 405:
            message = (
                f"{shown(request.method)} not allowed here; allowed: {exc.headers.get('Allow', '')}"
            )
        response = _problem(exc.status, exc.reason.lower().replace(" ", "_"), message)
        if "Allow" in exc.headers:  # a 405 names the methods the path takes (RFC 9110 15.5.6)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    hub.log.exception("%s %s failed", request.method, request.path)
    return _problem(500, "internal", "the hub failed on this request; see its diagnostics")


INGEST = {"/v1/pops": ingest_pops, "/v1/contacts": ingest_contacts}


def _direct(hub: Hub, routed: Any) -> Any:
    """The server's request handler: `POST /v1/pops` and `/v1/contacts` go straight to their
    handlers, past the router and the middleware chain (a sixth of aiohttp's CPU per request,
    PROFILE.md), with the same JSON errors; every other request goes through the application."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        ingest = INGEST.get(request.path) if request.method == "POST" else None
        if ingest is None or hdrs.EXPECT in request.headers:  # 100-continue: the app answers it
            return await routed(request)
        try:
            return await ingest(request, hub)  # type: ignore[arg-type]
        except Exception as exc:
            return _error_response(request, hub, exc)  # type: ignore[arg-type]

    return handle


def make_app(hub: Hub) -> web.Application:
    app = web.Application(client_max_size=hub.config.max_body, middlewares=[json_errors])
    app[HUB_KEY] = hub
    app.router.add_post("/v1/pops", post_pops)
    app.router.add_post("/v1/contacts", post_contacts)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/health", get_health)
    app.router.add_get("/openapi.json", get_openapi)
    from .browser import add_routes as add_browser_routes

    add_browser_routes(app)  # the SSE stream, spop.js and the agent panel (docs/browser.md)
    if hub.sources is not None:  # webhook sources (Twilio, mapped JSON) run inside the hub
        app.router.add_routes(hub.sources.routes())
    return app


class _RequestLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp logs every malformed request (a NUL byte in a header, a bad header line) with
    `exception()`: on a hub without a configured root logger that is a traceback on stderr for
    each request. Such a request is the client's fault: one line in the hub's diagnostics."""

    def exception(self, msg: object, *args: object, exc_info: object = True, **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else None
        reason = " ".join(str(error).split()) if error is not None else "unknown"
        self.warning("%s: %s", str(msg) % args, reason[:200])


class HttpPort:
    """The HTTP port: the lean front (fasthttp.py) and the aiohttp application behind it."""

    def __init__(self, front: Any, runner: web.AppRunner) -> None:
        self.front = front
        self.runner = runner

    async def cleanup(self) -> None:
        await self.front.close()
        await self.runner.cleanup()
        await self.front.wait_closed()


async def start_http(hub: Hub, ssl_context: ssl.SSLContext | None) -> tuple[HttpPort, int]:
    from .browser import fast_routes
    from .fasthttp import Front

    # keepalive_timeout also closes a connection that never completes a request head (idle
    # from the start, or dribbling its headers): aiohttp's timer runs until a request is parsed.
    # After an answer sent before the whole body came (a 408, a 413), aiohttp reads on for
    # lingering_time so the client sees the answer: no longer than a body is given.
    runner = web.AppRunner(
        make_app(hub),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=hub.config.http_idle_timeout,
        lingering_time=min(10.0, hub.config.http_body_timeout),
        logger=_RequestLog(hub.log.getChild("http"), {}),
    )
    await runner.setup()
    server = runner.server
    assert server is not None
    # aiohttp's Server takes its handler for each new connection from here
    server.request_handler = _direct(hub, server.request_handler)
    # what the lean front answers itself (fasthttp.py): the same handlers as the app's routes
    routes: dict[tuple[str, str], Any] = {
        # the handler's coroutine itself, hub given: no coroutine around it per request
        ("POST", path): functools.partial(handler, hub=hub)
        for path, handler in INGEST.items()
    }
    routes[("GET", "/v1/status")] = get_status
    routes[("GET", "/v1/health")] = get_health
    routes[("GET", "/openapi.json")] = get_openapi
    routes.update(fast_routes())
    front = Front(
        hub, runner.app, server, routes, lambda r, e: _error_response(r, hub, e), bool(ssl_context)
    )
    try:
        port = await front.start(hub.config.host, hub.config.http_port or 0, ssl_context)
    except BaseException:
        await runner.cleanup()
        raise
    return HttpPort(front, runner), port
