"""The `webhook` source: any platform's JSON webhooks, turned into lifecycle events by a mapping
written in the configuration (docs/sources/webhooks.md).

A request to `/v1/sources/NAME/PATH` is authenticated (a shared secret header, an HMAC-SHA256 of
the body, or both), its JSON body is matched against the rules in order, and the first rule that
matches makes one or more lifecycle events whose fields are templates over the body:
`{/json/pointer}`, with filters (`|upper`, `|lower`, `|TABLE` to look the value up in a table of
the configuration) and alternatives (`{/a || /b}`: the first one present).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from ..hookspecs import hookimpl
from ..hub.contacts import CONTACT_FIELDS, EVENT_FIELDS, MAX_EVENT_ID_LEN, QUEUE_FIELDS
from . import Source, SourceContext, SourceError
from .http_common import WebhookError, deliver, problem, read_body

OPTIONS = (
    "path",
    "secret",
    "secret_env",
    "secret_header",
    "hmac_secret",
    "hmac_secret_env",
    "hmac_header",
    "hmac_prefix",
    "hmac_encoding",
    "allow_unauthenticated",
    "fields",
    "contact_data",
    "tables",
    "rules",
)
RULE_KEYS = ("name", "when", "event", "fields", "contact_data")
TEXT_FIELDS = ("id", "contact_id", "at", "media", "source", "destination", "queue_name")
FIELDS = (*TEXT_FIELDS, "contact_description", "resource", "from", "redirect")
FILTERS = ("upper", "lower")
PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


# -- templates -------------------------------------------------------------------------------------
def resolve(document: Any, pointer: str) -> Any:
    """RFC 6901 JSON pointer; None when absent (a JSON null counts as absent)."""
    if pointer == "":
        return document
    value = document
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(value, Mapping):
            value = value.get(token)
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            return None
        if value is None:
            return None
    return value


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)  # numbers, true/false, objects


@dataclass(frozen=True)
class _Alternative:
    pointer: str
    filters: tuple[str, ...]


class Template:
    """A text with `{…}` placeholders; `{{` and `}}` are literal braces."""

    def __init__(self, text: Any, tables: Mapping[str, Mapping[str, str]], key: str) -> None:
        if not isinstance(text, str):
            raise SourceError(f"must be a string template, not {type(text).__name__}", key)
        self.text = text
        self.parts: list[str | list[_Alternative]] = []
        self.tables = tables
        last = 0
        for found in PLACEHOLDER.finditer(text):
            if found.start() > last:
                self.parts.append(text[last : found.start()])
            last = found.end()
            token = found.group(0)
            if token in ("{{", "}}"):
                self.parts.append(token[0])
            elif found.group(1) is None:
                raise SourceError(
                    f"unbalanced {token!r} in {text!r} (write {token * 2} for a brace)", key
                )
            else:
                self.parts.append(self._placeholder(found.group(1), key))
        if last < len(text):
            self.parts.append(text[last:])

    def _placeholder(self, inside: str, key: str) -> list[_Alternative]:
        alternatives = []
        for alternative in inside.split("||"):
            pointer, *filters = (part.strip() for part in alternative.split("|"))
            if pointer and not pointer.startswith("/"):
                raise SourceError(
                    f"{{{inside}}}: {pointer!r} is not a JSON pointer (it starts with /, e.g. /detail/contactId)",
                    key,
                )
            for name in filters:
                if name not in FILTERS and name not in self.tables:
                    known = ", ".join([*FILTERS, *self.tables]) or "none"
                    raise SourceError(
                        f"{{{inside}}}: no filter or table {name!r} (known: {known})", key
                    )
            alternatives.append(_Alternative(pointer, tuple(filters)))
        return alternatives

    @property
    def literal(self) -> str | None:
        """The text when the template has no placeholder."""
        return "".join(p for p in self.parts if isinstance(p, str)) if self.is_literal else None

    @property
    def is_literal(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    def _value(self, alternatives: list[_Alternative], body: Any) -> str | None:
        for alternative in alternatives:
            value = resolve(body, alternative.pointer)
            if value is None:
                continue
            text: str | None = _as_text(value)
            for name in alternative.filters:
                if text is None:
                    break
                if name == "upper":
                    text = text.upper()
                elif name == "lower":
                    text = text.lower()
                else:
                    table = self.tables[name]
                    text = table.get(text, table.get("*"))
            if text is not None:
                return text
        return None

    def render(self, body: Any) -> str | None:
        """The text; None when the template is one placeholder and nothing it names is there
        (the field is then left out); a missing placeholder inside longer text is empty."""
        if len(self.parts) == 1 and not isinstance(self.parts[0], str):
            return self._value(self.parts[0], body)
        out = []
        for part in self.parts:
            out.append(part if isinstance(part, str) else (self._value(part, body) or ""))
        return "".join(out)


# -- rules -----------------------------------------------------------------------------------------
@dataclass
class Rule:
    name: str
    when: list[tuple[str, list[Any]]]
    events: list[Template]
    fields: dict[str, Template]
    contact_data: dict[str, Template] = field(default_factory=dict)

    def matches(self, body: Any) -> bool:
        return all(resolve(body, pointer) in wanted for pointer, wanted in self.when)

    def render(self, body: Any) -> list[dict[str, Any]]:
        kinds = [template.render(body) for template in self.events]
        values = {name: template.render(body) for name, template in self.fields.items()}
        data = {key: t.render(body) for key, t in self.contact_data.items()}
        data = {key: value for key, value in data.items() if value is not None}
        out = []
        for kind in kinds:
            event: dict[str, Any] = {"event": kind}
            takes = _takes(kind) if kind in EVENT_FIELDS else set(FIELDS) | {"contact_data"}
            for name, value in values.items():
                if value is not None and name in takes:
                    event[name] = value
            if data and "contact_data" in takes:
                event["contact_data"] = data
            if len(kinds) > 1 and "id" in event:
                event["id"] = _joined_id(event["id"], kind)
            out.append(event)
        return out


def _joined_id(event_id: str, kind: str) -> str:
    """`ID:EVENT`; past the hub's 256 characters, a digest of it (`sha256:` and 32 hex digits):
    stable, so a retried delivery is still a duplicate, where the long id would be refused."""
    joined = f"{event_id}:{kind}"
    if len(joined) <= MAX_EVENT_ID_LEN:
        return joined
    return "sha256:" + hashlib.sha256(joined.encode()).hexdigest()[:32]


def _takes(kind: str) -> set[str]:
    contact = QUEUE_FIELDS if kind == "requeued" else CONTACT_FIELDS
    return {"id", "contact_id", "at", *contact, *EVENT_FIELDS[kind]}


def _scalars(value: Any) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str | int | float | bool)] if values else []


def _templates(
    value: Any, tables: Mapping[str, Mapping[str, str]], key: str, known: tuple[str, ...] | None
) -> dict[str, Template]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SourceError("must be a table of templates", key)
    out = {}
    for name, text in value.items():
        if known is not None and name not in known:
            raise SourceError(f"unknown field (known: {', '.join(known)})", f"{key}.{name}")
        out[str(name)] = Template(text, tables, f"{key}.{name}")
    return out


def _rule(
    index: int,
    table: Any,
    tables: Mapping[str, Mapping[str, str]],
    defaults: dict[str, Template],
    default_data: dict[str, Template],
) -> Rule:
    where = f"rules[{index}]"
    if not isinstance(table, Mapping):
        raise SourceError("must be a table ([[sources.NAME.rules]])", where)
    for key in table:
        if key not in RULE_KEYS:
            raise SourceError(f"unknown key (known: {', '.join(RULE_KEYS)})", f"{where}.{key}")
    name = table.get("name", where)
    if not isinstance(name, str) or not name:
        raise SourceError("must be a non-empty string", f"{where}.name")
    when_table = table.get("when", {})
    if not isinstance(when_table, Mapping):
        raise SourceError(
            'must be a table of JSON pointer = value (e.g. "/detail/eventType" = "QUEUED")',
            f"{where}.when",
        )
    when = []
    for pointer, wanted in when_table.items():
        if pointer and not pointer.startswith("/"):
            raise SourceError("is not a JSON pointer (it starts with /)", f"{where}.when.{pointer}")
        values = _scalars(wanted)
        if not values or (isinstance(wanted, list) and len(values) != len(wanted)):
            raise SourceError(
                "must be a string, number or boolean, or a list of them", f"{where}.when.{pointer}"
            )
        when.append((pointer, values))
    raw_events = table.get("event")
    if raw_events is None:
        raise SourceError("is required: the lifecycle event(s) this rule makes", f"{where}.event")
    listed = raw_events if isinstance(raw_events, list) else [raw_events]
    if not listed:
        raise SourceError("names no event", f"{where}.event")
    events = [Template(kind, tables, f"{where}.event") for kind in listed]
    for template in events:
        kind = template.literal
        if kind is not None and kind not in EVENT_FIELDS:
            raise SourceError(
                f"unknown event {kind!r} (expected {', '.join(EVENT_FIELDS)})", f"{where}.event"
            )
    fields = {**defaults, **_templates(table.get("fields"), tables, f"{where}.fields", FIELDS)}
    data = {
        **default_data,
        **_templates(table.get("contact_data"), tables, f"{where}.contact_data", None),
    }
    if "contact_id" not in fields:
        raise SourceError(
            "no contact_id: set it in this rule's fields or the source's",
            f"{where}.fields.contact_id",
        )
    literal = [t.literal for t in events if t.literal is not None]
    own = set(table.get("fields") or {})
    for kind in literal:
        if "resource" in EVENT_FIELDS[kind] and "resource" not in fields:
            raise SourceError(
                f"{kind} needs a resource: set fields.resource", f"{where}.fields.resource"
            )
    if len(literal) == len(events):
        for given in own:
            if not any(given in _takes(kind) for kind in literal):
                raise SourceError(
                    f"{' and '.join(literal)} does not take {given}", f"{where}.fields.{given}"
                )
        if table.get("contact_data") and not any("contact_data" in _takes(k) for k in literal):
            raise SourceError(
                f"{' and '.join(literal)} does not take contact_data", f"{where}.contact_data"
            )
    return Rule(name, when, events, fields, data)


def _secret(options: Mapping[str, Any], key: str, env_key: str) -> bytes | None:
    value = options.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise SourceError("must be a non-empty string", key)
    env = options.get(env_key)
    if env is not None and (not isinstance(env, str) or not env):
        raise SourceError("must be the name of an environment variable", env_key)
    if value is None and env is not None:
        value = os.environ.get(env)
        if not value:
            raise SourceError(f"the environment variable {env} is not set", env_key)
    return value.encode() if value else None


def _string(options: Mapping[str, Any], key: str, default: str) -> str:
    value = options.get(key, default)
    if not isinstance(value, str) or not value:
        raise SourceError("must be a non-empty string", key)
    return value


# -- the source ------------------------------------------------------------------------------------
class WebhookSource(Source):
    """A named webhook path and its mapping."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise SourceError(f"unknown key (known: {', '.join(OPTIONS)})", unknown[0])
        self.path = _string(options, "path", "events").strip("/")
        if not re.fullmatch(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*", self.path):
            raise SourceError(
                "must be a plain path such as events (letters, digits, . _ ~ -)", "path"
            )
        self.secret = _secret(options, "secret", "secret_env")
        self.secret_header = _string(options, "secret_header", "X-Spop-Secret")
        self.hmac_secret = _secret(options, "hmac_secret", "hmac_secret_env")
        self.hmac_header = _string(options, "hmac_header", "X-Spop-Signature")
        self.hmac_prefix = options.get("hmac_prefix", "sha256=")
        if not isinstance(self.hmac_prefix, str):
            raise SourceError("must be a string (may be empty)", "hmac_prefix")
        self.hmac_encoding = _string(options, "hmac_encoding", "hex")
        if self.hmac_encoding not in ("hex", "base64"):
            raise SourceError("must be hex or base64", "hmac_encoding")
        self.unauthenticated = options.get("allow_unauthenticated", False)
        if not isinstance(self.unauthenticated, bool):
            raise SourceError("must be true or false", "allow_unauthenticated")
        if self.secret is None and self.hmac_secret is None and not self.unauthenticated:
            raise SourceError(
                "no secret: set secret (a header the platform sends) or hmac_secret, "
                "or allow_unauthenticated = true to accept anyone who reaches the port",
                "secret",
            )
        raw_tables = options.get("tables", {})
        if not isinstance(raw_tables, Mapping):
            raise SourceError("must be a table of tables", "tables")
        self.tables: dict[str, dict[str, str]] = {}
        for name, table in raw_tables.items():
            if name in FILTERS:
                raise SourceError(f"{name!r} is a filter's name", f"tables.{name}")
            if not isinstance(table, Mapping) or not all(
                isinstance(v, str) for v in table.values()
            ):
                raise SourceError("must be a table of strings (key = value)", f"tables.{name}")
            self.tables[str(name)] = {str(k): v for k, v in table.items()}
        defaults = _templates(options.get("fields"), self.tables, "fields", FIELDS)
        default_data = _templates(options.get("contact_data"), self.tables, "contact_data", None)
        rules = options.get("rules")
        if not isinstance(rules, list) or not rules:
            raise SourceError("must be a non-empty array of [[sources.NAME.rules]] tables", "rules")
        self.rules = [
            _rule(i, table, self.tables, defaults, default_data) for i, table in enumerate(rules)
        ]
        names = [rule.name for rule in self.rules]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise SourceError(f"rule name {name!r} is used twice", f"rules[{index}].name")

    def __repr__(self) -> str:  # never the secrets
        return f"WebhookSource(path={self.path!r}, rules={len(self.rules)})"

    def routes(self, ctx: SourceContext) -> list[Any]:
        async def hook(request: web.Request) -> web.Response:
            return await self.handle(ctx, request)

        return [web.post(f"/v1/sources/{ctx.name}/{self.path}", hook)]

    async def check(self, ctx: SourceContext, out: Any) -> bool:
        out(
            f"{ctx.name}: POST JSON to /v1/sources/{ctx.name}/{self.path}; {len(self.rules)} rule(s)"
        )
        if self.secret is not None:
            out(f"{ctx.name}: the platform must send the secret in the {self.secret_header} header")
        if self.hmac_secret is not None:
            out(f"{ctx.name}: the platform must sign the body in {self.hmac_header} (HMAC-SHA256)")
        if self.unauthenticated and self.secret is None and self.hmac_secret is None:
            out(f"{ctx.name}: warning: no secret: anyone who reaches the port can post events")
        return True

    # -- a request ---------------------------------------------------------------------------------
    async def handle(self, ctx: SourceContext, request: web.Request) -> web.Response:
        what = f"webhook {ctx.name}"
        try:
            raw = await read_body(request)
            self.authenticate(request, raw, ctx)
            events, rules = self.map(_json_body(raw))
        except WebhookError as exc:
            if exc.status != 403:
                ctx.log.warning("%s: %s (%s)", what, exc.message, exc.error)
            return problem(exc.status, exc.error, exc.message)
        matched = sorted({rule for rule in rules if rule is not None})
        if not events:
            return web.json_response({"applied": 0, "pops": [], "matched": []})
        # an `ended` for a contact already over (or never seen) is done, not an error to retry
        over = frozenset({"contact_ended", "unknown_contact"})
        status, body = await deliver(ctx.sink, events, ctx.log, what, ok_errors=over)
        if status == 200:
            return web.json_response({**body, "matched": matched})
        index = body.get("index")
        if isinstance(index, int) and 0 <= index < len(rules):
            body = {**body, "rule": rules[index]}
            ctx.log.warning("%s: rule %s made an event the hub refused", what, rules[index])
        return web.json_response(body, status=status)

    def authenticate(self, request: web.Request, raw: bytes, ctx: SourceContext) -> None:
        if self.secret is not None:
            given = request.headers.get(self.secret_header, "").encode()
            if not hmac.compare_digest(given, self.secret):
                why = "missing" if not given else "wrong"
                ctx.log.warning(
                    "webhook %s: refused from %s: %s %s",
                    ctx.name,
                    request.remote,
                    why,
                    self.secret_header,
                )
                raise WebhookError(403, "forbidden", f"{why} {self.secret_header}")
        if self.hmac_secret is not None:
            given = request.headers.get(self.hmac_header, "")
            digest = hmac.new(self.hmac_secret, raw, hashlib.sha256).digest()
            encoded = (
                digest.hex() if self.hmac_encoding == "hex" else base64.b64encode(digest).decode()
            )
            if not hmac.compare_digest(given.encode(), (self.hmac_prefix + encoded).encode()):
                why = "missing" if not given else "wrong"
                ctx.log.warning(
                    "webhook %s: refused from %s: %s %s",
                    ctx.name,
                    request.remote,
                    why,
                    self.hmac_header,
                )
                raise WebhookError(
                    403, "forbidden", f"{why} {self.hmac_header} (HMAC-SHA256 of the body)"
                )

    def map(self, body: Any) -> tuple[list[dict[str, Any]], list[str | None]]:
        """The events a body (or an array of bodies) makes, and the rule that made each."""
        bodies = body if isinstance(body, list) else [body]
        events: list[dict[str, Any]] = []
        rules: list[str | None] = []
        for item in bodies:
            if not isinstance(item, Mapping):
                raise WebhookError(
                    400, "not_an_object", "the body must be a JSON object or an array of them"
                )
            rule = next((r for r in self.rules if r.matches(item)), None)
            if rule is None:
                continue
            made = rule.render(item)
            events.extend(made)
            rules.extend([rule.name] * len(made))
        return events, rules


def _json_body(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WebhookError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None


@hookimpl
def register_sources(register: Any) -> None:
    register(
        "webhook", WebhookSource, "any platform's JSON webhooks, mapped by rules in the config"
    )
