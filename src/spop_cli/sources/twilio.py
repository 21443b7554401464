"""The `twilio` source: Twilio TaskRouter workspace event callbacks become contact lifecycle events.

TaskRouter POSTs each workspace event, form-encoded, to the workspace's Event Callback URL. The
request is checked against `X-Twilio-Signature` (HMAC-SHA1 with the account's auth token over the
URL Twilio called and the sorted parameters) before anything is read from it. Tasks are contacts
(`contact_id` = TaskSid), reservations are offers to workers; the mapping is in
docs/sources/twilio.md. The answer (204) is sent once the hub has committed the events.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from aiohttp import web

from ..hookspecs import hookimpl
from . import Source, SourceContext, SourceError
from .http_common import WebhookError, deliver, problem, read_body

ANSWER_WITHIN = 12.0  # s: TaskRouter waits 15 s for an answer, then gives up on it

MEDIA = ("telephone", "callback", "email", "webcollab")
DEFAULT_MEDIA_OF_CHANNEL = {
    "voice": "telephone",
    "chat": "webcollab",
    "sms": "webcollab",
    "video": "webcollab",
    "email": "email",
}
TASK_ENDS = frozenset({"task.canceled", "task.completed", "task.wrapup", "task.deleted"})
TASK_QUEUED = frozenset({"task.created", "task-queue.entered", "task-queue.moved"})
RESERVATION_EVENTS = frozenset(
    {"reservation.created", "reservation.accepted", "reservation.rejected", "reservation.timeout"}
)
RESERVATION_FAILS = frozenset({"reservation.rejected", "reservation.timeout"})
MAX_TASKS = 10_000  # tasks whose accepting worker is remembered (transfers, recalls)
MAX_DATA_KEYS = 256
MAX_DATA_LEN = 4096
OPTIONS = {
    "auth_token": "the account's auth token (or the environment variable auth_token_env names)",
    "auth_token_env": "environment variable holding the auth token (default TWILIO_AUTH_TOKEN)",
    "public_url": "the URL Twilio calls, up to the path (https://spop.example.com)",
    "path": "the last part of the callback path /v1/sources/NAME/PATH (default events)",
    "resource_attributes": "worker attributes giving the resource, first found wins",
    "strip_prefixes": "prefixes removed from the resource (default client:)",
    "resource_fallback": "none, worker_name or worker_sid when no attribute is set",
    "media": "table: task channel unique name -> media",
    "default_media": "the media of a channel not in `media` (default webcollab)",
    "callback_attribute": "task attribute marking a callback task (default type)",
    "callback_value": "its value for a callback (default callback)",
    "source_attributes": "task attributes giving the customer's number or address",
    "destination_attributes": "task attributes giving what the customer dialled or wrote to",
    "queue_names": "table: TaskQueueSid -> queue name, when TaskQueueName is not sent",
    "data_attributes": "task attributes copied into contact_data (default: all)",
    "use_timestamps": "send TaskRouter's Timestamp as each event's `at` (default true)",
    "transfer_attributes": "task attributes naming the task a new (transfer) task continues",
}


# -- options ---------------------------------------------------------------------------------------
def _string(options: Mapping[str, Any], key: str, default: str) -> str:
    value = options.get(key, default)
    if not isinstance(value, str):
        raise SourceError(f"must be a string, not {type(value).__name__}", key)
    return value


def _strings(options: Mapping[str, Any], key: str, default: list[str]) -> list[str]:
    value = options.get(key, default)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SourceError("must be a list of non-empty strings", key)
    return list(value)


def _table(options: Mapping[str, Any], key: str) -> dict[str, str]:
    value = options.get(key, {})
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        raise SourceError("must be a table of strings", key)
    return {str(k): v for k, v in value.items()}


def _media(value: str, key: str) -> str:
    if value not in MEDIA:
        raise SourceError(f"unknown media {value!r} (expected {', '.join(MEDIA)})", key)
    return value


class TwilioSource(Source):
    """One TaskRouter workspace's event callbacks, on `/v1/sources/NAME/PATH`."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise SourceError(f"unknown key (known: {', '.join(OPTIONS)})", unknown[0])
        self.token_env = _string(options, "auth_token_env", "TWILIO_AUTH_TOKEN")
        token = options.get("auth_token")
        if token is not None and (not isinstance(token, str) or not token):
            raise SourceError("must be a non-empty string", "auth_token")
        token = token or os.environ.get(self.token_env)
        if not token:
            raise SourceError(
                f"no auth token: set auth_token, or the environment variable {self.token_env}; "
                "without it no callback can be verified",
                "auth_token",
            )
        self._token = token.encode()
        self.public_url = _string(options, "public_url", "").rstrip("/")
        if self.public_url and not self.public_url.startswith(("https://", "http://")):
            raise SourceError("must start with https:// (or http://)", "public_url")
        self.path = _string(options, "path", "events").strip("/")
        if not self.path or "{" in self.path:
            raise SourceError("must be a plain path part such as events", "path")
        self.resource_attributes = _strings(
            options, "resource_attributes", ["extension", "contact_uri"]
        )
        self.strip_prefixes = _strings(options, "strip_prefixes", ["client:"])
        self.resource_fallback = _string(options, "resource_fallback", "none")
        if self.resource_fallback not in ("none", "worker_name", "worker_sid"):
            raise SourceError("must be none, worker_name or worker_sid", "resource_fallback")
        channels = _table(options, "media")
        self.channels = {
            **DEFAULT_MEDIA_OF_CHANNEL,
            **{name: _media(media, f"media.{name}") for name, media in channels.items()},
        }
        self.default_media = _media(_string(options, "default_media", "webcollab"), "default_media")
        self.callback_attribute = _string(options, "callback_attribute", "type")
        self.callback_value = _string(options, "callback_value", "callback")
        self.source_attributes = _strings(options, "source_attributes", ["from", "caller"])
        self.destination_attributes = _strings(options, "destination_attributes", ["to", "called"])
        self.queue_names = _table(options, "queue_names")
        self.data_attributes = _strings(options, "data_attributes", [])
        self.use_timestamps = options.get("use_timestamps", True)
        if not isinstance(self.use_timestamps, bool):
            raise SourceError("must be true or false", "use_timestamps")
        self.transfer_attributes = _strings(
            options, "transfer_attributes", ["original_task_sid", "originalTaskSid"]
        )
        # contact → resource of the worker who accepted it: a new reservation is then a transfer
        self._holders: OrderedDict[str, str] = OrderedDict()
        self._known: OrderedDict[str, None] = OrderedDict()  # contacts already queued at the hub
        # a transfer made as a new task: its sid → the contact (the first task's sid) it continues
        self._aliases: OrderedDict[str, str] = OrderedDict()
        self._open: OrderedDict[str, set[str]] = OrderedDict()  # contact → its tasks not ended

    def __repr__(self) -> str:  # never the token
        return f"TwilioSource(path={self.path!r}, public_url={self.public_url!r})"

    # -- the route ---------------------------------------------------------------------------------
    def routes(self, ctx: SourceContext) -> list[Any]:
        async def callback(request: web.Request) -> web.Response:
            return await self.handle(ctx, request)

        return [web.post(f"/v1/sources/{ctx.name}/{self.path}", callback)]

    async def check(self, ctx: SourceContext, out: Any) -> bool:
        where = self.public_url or "http(s)://THIS-HOST[:PORT]"
        out(
            f"{ctx.name}: set the workspace's Event Callback URL to {where}/v1/sources/{ctx.name}/{self.path}"
        )
        out(f"{ctx.name}: requests are verified with the auth token (X-Twilio-Signature)")
        return True

    async def handle(self, ctx: SourceContext, request: web.Request) -> web.Response:
        what = f"twilio {ctx.name}"
        try:
            raw = await read_body(request)
            params = self._form(request, raw)
            self.verify(request, params, ctx.log)
            events = self.map(params)
        except WebhookError as exc:
            if exc.status != 403:
                ctx.log.warning("%s: %s (%s)", what, exc.message, exc.error)
            return problem(exc.status, exc.error, exc.message)
        kind, task = dict(params).get("EventType", ""), dict(params).get("TaskSid", "")
        if not events:
            if kind in TASK_ENDS:  # a task of a transfer ended; the contact's other task goes on
                self._forget_task(task)
            ctx.log.debug("%s: %s ignored", what, kind)
            return _no_content()
        contact = events[0]["contact_id"]
        status, body = await deliver(
            ctx.sink,
            events,
            ctx.log,
            what,
            ok_errors=frozenset({"contact_ended", "unknown_contact"}),
            answer_within=ANSWER_WITHIN,
        )
        catch_up = events[0].get("id", "").endswith(":queued")  # our own queued, before a routed
        if catch_up and body.get("error") == "time_backwards" and body.get("index") == 0:
            status, body = await deliver(  # it was known
                ctx.sink, events[1:], ctx.log, what, answer_within=ANSWER_WITHIN
            )
        if status != 200:
            return problem(
                status, body.get("error", "refused"), body.get("message", ""), **_rest(body)
            )
        self._remember(task, contact, events)
        return _no_content()

    # -- reading and checking ----------------------------------------------------------------------
    @staticmethod
    def _form(request: web.Request, raw: bytes) -> list[tuple[str, str]]:
        if request.content_type != "application/x-www-form-urlencoded":
            raise WebhookError(
                415,
                "not_a_form",
                f"expected application/x-www-form-urlencoded, got {request.content_type!r}",
            )
        try:
            return parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw))
        except (UnicodeDecodeError, ValueError) as exc:
            raise WebhookError(400, "bad_form", f"the body is not a form: {exc}") from None

    def signed_url(self, request: web.Request) -> str:
        """The URL Twilio signed: public_url + path and query when set (behind a proxy), else the
        URL this request came to (scheme and Host header as received)."""
        if self.public_url:
            return self.public_url + request.path_qs
        return str(request.url)

    def verify(
        self, request: web.Request, params: list[tuple[str, str]], log: logging.Logger
    ) -> None:
        given = request.headers.get("X-Twilio-Signature")
        url = self.signed_url(request)
        if not given:
            log.warning("twilio: refused %s from %s: no X-Twilio-Signature", url, request.remote)
            raise WebhookError(403, "unsigned", "no X-Twilio-Signature header")
        matches = [
            hmac.compare_digest(given.encode(), signature(self._token, candidate, params).encode())
            for candidate in _url_variants(url)
        ]
        if not any(matches):
            log.warning(
                "twilio: refused %s from %s: X-Twilio-Signature does not match (wrong auth token, "
                "or Twilio called another URL: set public_url to the URL in the workspace)",
                url,
                request.remote,
            )
            raise WebhookError(403, "bad_signature", "X-Twilio-Signature does not match")

    # -- mapping -----------------------------------------------------------------------------------
    def map(self, form: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """The lifecycle events one callback stands for ([] when it is none of ours)."""
        params = dict(form)
        kind = params.get("EventType")
        if not kind:
            raise WebhookError(400, "missing_parameter", "EventType is missing")
        task = params.get("TaskSid")
        if kind not in TASK_ENDS | TASK_QUEUED | RESERVATION_EVENTS:
            return []  # task.updated, task.transfer-*, reservation.canceled, worker.*, …
        if not task:
            raise WebhookError(400, "missing_parameter", f"{kind} without TaskSid")
        attributes = {} if kind in TASK_ENDS else _attributes(params)
        contact = self._contact_of(task, attributes)
        base: dict[str, Any] = {"contact_id": contact, "id": _event_id(params, kind)}
        at = self._at(params) if self.use_timestamps else None
        if at is not None:
            base["at"] = at
        if kind in TASK_ENDS:
            if self._open.get(contact, set()) - {task}:
                return []  # a transfer's new task goes on: the contact is not over
            return [{**base, "event": "ended"}]
        if kind in TASK_QUEUED:
            if kind == "task.created" and at is not None:
                base["at"] = self._created_at(params) or at
            return [{**base, "event": "queued", **self._contact(params, attributes)}]
        resource = self._resource(params)
        holder = self._holders.get(contact)
        if kind == "reservation.created":
            events = []
            if contact not in self._known:  # task.created never came (filtered, or before a start)
                events.append(
                    {
                        **base,
                        "id": base["id"] + ":queued",
                        "event": "queued",
                        **({"at": self._created_at(params)} if at is not None else {}),
                        **self._contact(params, attributes),
                    }
                )
            queue = self._queue(params)
            if queue:  # the queue that offers the task: a routed pop shows it
                base["queue_name"] = queue
            if holder is not None and holder != resource:
                events.append(
                    {**base, "event": "transferred", "from": holder, "resource": resource}
                )
            else:
                events.append({**base, "event": "routed", "resource": resource})
            return events
        if kind == "reservation.accepted":
            return [{**base, "event": "answered", "resource": resource}]
        if kind in RESERVATION_FAILS and holder is not None and holder != resource:
            return [{**base, "event": "recalled", "resource": holder}]
        return []  # a first offer turned down: TaskRouter offers the task to the next worker

    def _contact_of(self, task: str, attributes: Mapping[str, Any]) -> str:
        """The contact a task belongs to: its own sid, or, for a task made to transfer another
        (an attribute of `transfer_attributes` names that one), the contact the other belongs to."""
        if task in self._aliases:
            return self._aliases[task]
        original = _first(attributes, self.transfer_attributes)
        if original and original != task and (original in self._open or original in self._aliases):
            return self._aliases.get(original, original)
        return task

    def _forget_task(self, task: str) -> None:
        contact = self._aliases.pop(task, task)
        tasks = self._open.get(contact)
        if tasks is not None:
            tasks.discard(task)

    def _remember(self, task: str, contact: str, events: list[dict[str, Any]]) -> None:
        """What the hub has now taken: which contact a task is part of, that the contact is
        queued there, who holds it, and its end (forgetting it all)."""
        kinds = {event["event"] for event in events}
        if "ended" in kinds:
            for sid in self._open.pop(contact, set()) | {task}:
                self._aliases.pop(sid, None)
            self._holders.pop(contact, None)
            self._known.pop(contact, None)
            return
        if contact != task:
            _bounded_set(self._aliases, task, contact)
        _bounded_set(self._open, contact, self._open.get(contact, set()) | {task})
        if kinds & {"queued", "routed", "transferred"}:
            _bounded_set(self._known, contact, None)
        if kinds & {"answered", "recalled"}:
            _bounded_set(self._holders, contact, events[-1]["resource"])

    def _contact(self, params: Mapping[str, str], attributes: Mapping[str, Any]) -> dict[str, Any]:
        media = self.channels.get(params.get("TaskChannelUniqueName", ""), self.default_media)
        if str(attributes.get(self.callback_attribute, "")) == self.callback_value:
            media = "callback"
        fields: dict[str, Any] = {"media": media}
        customer = _first(attributes, self.source_attributes)
        dialled = _first(attributes, self.destination_attributes)
        if media == "callback":  # a callback's destination is the customer's number (guide)
            dialled = customer
        if customer and media != "callback":
            fields["source"] = customer[:1024]
        if dialled:
            fields["destination"] = dialled[:1024]
        queue = self._queue(params)
        if queue:
            fields["queue_name"] = queue[:1024]
        data = _contact_data(attributes, self.data_attributes)
        if data:
            fields["contact_data"] = data
        return fields

    def _queue(self, params: Mapping[str, str]) -> str:
        name = params.get("TaskQueueName") or self.queue_names.get(
            params.get("TaskQueueSid", ""), ""
        )
        return name[:1024]

    def _resource(self, params: Mapping[str, str]) -> str:
        attributes = _json_object(params.get("WorkerAttributes"), "WorkerAttributes")
        value = _first(attributes, self.resource_attributes)
        if not value and self.resource_fallback != "none":
            value = params.get(
                "WorkerName" if self.resource_fallback == "worker_name" else "WorkerSid", ""
            )
        if not value:
            tried = ", ".join(self.resource_attributes)
            raise WebhookError(
                422,
                "no_resource",
                f"worker {params.get('WorkerSid', '?')} has none of the attributes {tried}: "
                "set one on the worker, or resource_fallback",
            )
        for prefix in self.strip_prefixes:
            if value.startswith(prefix):
                value = value[len(prefix) :]
                break
        return value

    @staticmethod
    def _at(params: Mapping[str, str]) -> str | None:
        moment = _moment(params.get("EventDateMs"), 1000.0) or _moment(params.get("Timestamp"), 1.0)
        if moment is None and params.get("EventDate"):
            try:
                moment = datetime.fromisoformat(params["EventDate"].replace("Z", "+00:00"))
            except ValueError:
                raise WebhookError(
                    400, "bad_time", f"EventDate {params['EventDate'][:40]!r}"
                ) from None
        return _iso(moment) if moment is not None else None

    def _created_at(self, params: Mapping[str, str]) -> str | None:
        """When the task was created: the event's time less TaskAge (whole seconds)."""
        at = self._at(params)
        age = params.get("TaskAge", "")
        if at is None or not age:
            return at
        if not (age.isascii() and age.isdigit()):
            raise WebhookError(
                400, "bad_time", f"TaskAge: expected whole seconds, got {age[:40]!r}"
            )
        moment = datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() - int(age)
        try:
            return _iso(datetime.fromtimestamp(moment, UTC))
        except (OverflowError, OSError, ValueError):
            raise WebhookError(
                400, "bad_time", f"TaskAge {age[:40]} s before {at} is out of range"
            ) from None


def signature(token: bytes, url: str, params: list[tuple[str, str]]) -> str:
    """X-Twilio-Signature: base64 HMAC-SHA1 of the URL followed by each parameter's name and value,
    sorted by name then value, a repeated pair once (as Twilio's own validators do)."""
    payload = url + "".join(key + value for key, value in sorted(set(params)))
    return base64.b64encode(
        hmac.new(token, payload.encode("utf-8"), hashlib.sha1).digest()
    ).decode()


def _url_variants(url: str) -> list[str]:
    """The URL as received, and with its default port written or left out: Twilio signs the URL
    as configured, and proxies differ in whether they pass `:443` on."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    if parts.port is None and default is not None:
        other = parts._replace(netloc=f"{prefix}{host}:{default}")
    elif parts.port == default:
        other = parts._replace(netloc=f"{prefix}{host}")
    else:
        return [url]
    return [url, urlunsplit(other)]


def _event_id(params: Mapping[str, str], kind: str) -> str:
    sid = params.get("Sid") or params.get("EventSid")
    if sid:
        return sid
    return f"{kind}:{params.get('ResourceSid', '')}:{params.get('Timestamp', '')}:{params.get('EventDateMs', '')}"


def _moment(value: str | None, per_second: float) -> datetime | None:
    if not value:
        return None
    if not value.isdigit():
        raise WebhookError(400, "bad_time", f"expected seconds since 1970, got {value[:40]!r}")
    number = int(value) / per_second
    if number > 1e11:  # Timestamp in milliseconds
        number /= 1000
    try:
        return datetime.fromtimestamp(number, UTC)
    except (OverflowError, OSError, ValueError):
        raise WebhookError(400, "bad_time", f"time out of range: {value[:40]!r}") from None


def _iso(moment: datetime) -> str:
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_object(text: str | None, name: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise WebhookError(400, "bad_attributes", f"{name} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise WebhookError(400, "bad_attributes", f"{name} is not a JSON object")
    return value


def _attributes(params: Mapping[str, str]) -> dict[str, Any]:
    return _json_object(params.get("TaskAttributes"), "TaskAttributes")


def _first(attributes: Mapping[str, Any], names: list[str]) -> str:
    for name in names:
        value = attributes.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    return ""


def _contact_data(attributes: Mapping[str, Any], keep: list[str]) -> dict[str, str]:
    """Task attributes as contact data: strings as they are, anything else as JSON text."""
    data: dict[str, str] = {}
    for key, value in attributes.items():
        if keep and key not in keep:
            continue
        if len(data) == MAX_DATA_KEYS:
            break
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        data[str(key)[:MAX_DATA_LEN]] = text[:MAX_DATA_LEN]
    return data


def _bounded_set(table: OrderedDict[str, Any], key: str, value: Any) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > MAX_TASKS:
        table.popitem(last=False)


def _rest(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("error", "message")}


def _no_content() -> web.Response:
    # TaskRouter asks for 204 with an application/json content type
    return web.Response(status=204, headers={"Content-Type": "application/json"})


@hookimpl
def register_sources(register: Any) -> None:
    register(
        "twilio", TwilioSource, "Twilio TaskRouter workspace event callbacks (signed webhooks)"
    )
