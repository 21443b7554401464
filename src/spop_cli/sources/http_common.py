"""What the webhook sources (twilio, webhook) share: JSON problems, the body limit, and handing
mapped events to the sink with the hub's refusal turned into an HTTP answer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web

from . import ContactSink

MAX_BODY = 1024 * 1024
BODY_TIMEOUT = 30.0  # s for a body once the head is in (the hub's http_body_timeout in a hub)
READ_CHUNK = 64 * 1024
# hub refusals that say the body was malformed (400); the others do not apply (422)
MALFORMED = frozenset({"not_an_object", "wrong_type", "bad_time", "invalid_json", "too_deep"})


class WebhookError(Exception):
    """A request the source refuses: its HTTP status, error code and a message naming the fix."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def problem(status: int, error: str, message: str, **extra: Any) -> web.Response:
    body = {"error": error, "message": message, **extra}
    response = web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
    if status == 408:  # the rest of the body is not awaited: the connection closes
        response.force_close()
    return response


async def read_body(request: web.Request, limit: int = MAX_BODY) -> bytes:
    """The whole raw body, to its end (`read(n)` gives what has arrived so far: a body sent in
    several packets, chunked, or over TLS was cut), within the body timeout (408) and `limit`
    (413: at once when the length says so)."""
    if request.content_length is not None and request.content_length > limit:
        raise WebhookError(413, "too_large", f"body of {request.content_length} bytes over {limit}")
    timeout = _body_timeout(request)
    content, chunks, size = request.content, [], 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await content.read(READ_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise WebhookError(413, "too_large", f"body over the {limit} byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise WebhookError(408, "timeout", f"body not received within {timeout:g} s") from None
    except (ConnectionError, ValueError) as exc:
        raise WebhookError(400, "bad_body", f"body could not be read: {exc}") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _body_timeout(request: web.Request) -> float:
    """The hub's `http_body_timeout` when the hub serves the route, else BODY_TIMEOUT."""
    from ..hub.http import HUB_KEY

    hub = request.app.get(HUB_KEY)
    config = getattr(hub, "config", None)
    return float(getattr(config, "http_body_timeout", BODY_TIMEOUT))


def refusal_of(exc: Exception) -> dict[str, Any] | None:
    """The hub's refusal detail (error, message, field, index, applied, pops) from either sink's
    exception, or None when `exc` is not a refusal (the hub could not be reached)."""
    from ..client import Rejected
    from ..hub.contacts import ContactEventError

    if isinstance(exc, ContactEventError):
        return {**exc.to_dict(), **getattr(exc, "applied_result", {})}
    if isinstance(exc, Rejected):
        return dict(exc.detail)
    return None


async def deliver(
    sink: ContactSink,
    events: list[dict[str, Any]],
    log: logging.Logger,
    what: str,
    *,
    ok_errors: frozenset[str] = frozenset(),
    answer_within: float | None = None,
) -> tuple[int, dict[str, Any]]:
    """Send events; (HTTP status, body). 200 with `{applied, pops}` once the hub has committed;
    a refusal keeps the hub's status and body (events before the refused one stay applied), except
    a refusal whose error is in `ok_errors` on an `ended` event (the contact is already over);
    503 when the hub cannot be reached (or not within `answer_within` s: a platform that gives
    up sooner would never see the 503), so the platform retries."""
    try:
        if answer_within is None:
            return 200, await sink.send(events)
        return 200, await asyncio.wait_for(sink.send(events), answer_within)
    except TimeoutError:
        why = f"the hub did not answer within {answer_within:g} s"
        log.error("%s: %s; %d event(s) not taken", what, why, len(events))
        return 503, {"error": "hub_unavailable", "message": why}
    except Exception as exc:
        detail = refusal_of(exc)
        if detail is None:
            log.error("%s: the hub did not take %d event(s): %s", what, len(events), exc)
            return 503, {"error": "hub_unavailable", "message": f"the hub did not answer: {exc}"}
        index = detail.get("index")
        event = events[index] if isinstance(index, int) and 0 <= index < len(events) else {}
        over = detail.get("error") in ok_errors and event.get("event") == "ended"
        if over and index == len(events) - 1:
            return 200, {"applied": detail.get("applied", 0), "pops": detail.get("pops", [])}
        status = 400 if detail.get("error") in MALFORMED else 422
        log.warning("%s: the hub refused event %s: %s", what, index, detail.get("message"))
        return status, detail
