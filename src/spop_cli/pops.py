"""Checking a pop a source sends (HTTP or `publish` frame) before the hub accepts it. Pure."""

from __future__ import annotations

from typing import Any

from .model import (
    MAX_CONTACT_ID_LEN,
    MAX_ID_LEN,
    MEDIA_FIELDS,
    TEXT_FIELDS,
    Media,
    ScreenPopError,
    iso_utc,
    new_pop_id,
    parse_time,
    utc_now_iso,
    validate_resource,
)
from .protocol import shown

MAX_TEXT = 1024
MAX_DATA_ITEMS = 256
MAX_DATA_TEXT = 4096
MAX_ID = MAX_ID_LEN
MAX_CONTACT_ID = (
    MAX_CONTACT_ID_LEN  # as /v1/contacts: a tracked contact may also be popped directly
)
KNOWN = frozenset(
    {
        "id",
        "media",
        "resource",
        "contact_id",
        "created_at",
        "wait_time",
        "contact_data",
        *TEXT_FIELDS,
    }
)


class InputError(Exception):
    """Input the hub refuses: HTTP status (400 malformed, 422 not acceptable), the field at fault."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.field = field
        self.index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        if self.index is not None:
            body["index"] = self.index
        return body


def _text(data: dict[str, Any], name: str, limit: int = MAX_TEXT) -> str:
    value = data.get(name)
    if value.__class__ is str and len(value) <= limit:  # the common case, first and cheap
        return value
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InputError(422, "wrong_type", f"{name} must be a string", name)
    text = str(value)
    if len(text) > limit:
        raise InputError(422, "too_long", f"{name} is longer than {limit} characters", name)
    return text


class DataError(ValueError):
    """`contact_data` breaks the one rule both ingest routes share; each names it its own way."""

    def __init__(self, error: str, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        self.key = key  # the key whose value is at fault, if any


def check_contact_data(value: Any, numbers: bool) -> dict[str, str]:
    """The rule of `contact_data` on /v1/pops and /v1/contacts (and both ports' frames): an
    object of at most 256 keys, each key 1-4096 characters, each value a string of at most 4096
    (a number turned into one when `numbers`: pops take numbers for text, contact events do not).
    Raises DataError naming `wrong_type`, `too_many_keys`, `wrong_key` or `too_long`."""
    if value.__class__ is dict and len(value) <= MAX_DATA_ITEMS:
        # the common case: short string keys and values, taken as they are
        for key, item in value.items():
            if (
                item.__class__ is not str
                or not key
                or len(key) > MAX_DATA_TEXT
                or len(item) > MAX_DATA_TEXT
            ):
                break
        else:
            return value
    if not isinstance(value, dict):
        raise DataError("wrong_type", "contact_data must be an object of key/value strings")
    if len(value) > MAX_DATA_ITEMS:
        raise DataError(
            "too_many_keys", f"contact_data has {len(value)} keys (at most {MAX_DATA_ITEMS})"
        )
    data: dict[str, str] = {}
    for key, item in value.items():
        if not key:
            raise DataError("wrong_key", "contact_data has an empty key")
        if len(key) > MAX_DATA_TEXT:
            raise DataError(
                "too_long", f"contact_data key {shown(key)} is longer than {MAX_DATA_TEXT}"
            )
        if isinstance(item, str):
            text = item
        elif numbers and isinstance(item, int | float) and not isinstance(item, bool):
            text = str(item)
        else:
            raise DataError("wrong_type", f"contact_data[{shown(key)}] must be a string", key)
        if len(text) > MAX_DATA_TEXT:
            raise DataError(
                "too_long", f"contact_data[{shown(key)}] is longer than {MAX_DATA_TEXT}", key
            )
        data[key] = text
    return data


def contact_data_from(value: Any, field: str = "contact_data") -> dict[str, str]:
    """A pop's contact_data (null: none), order kept, bounded; refusals are 422 naming the key."""
    if value is None:
        return {}
    try:
        return check_contact_data(value, numbers=True)
    except DataError as exc:
        where = field if exc.key is None else f"{field}.{exc.key[:64]}"  # never echo more
        raise InputError(422, exc.error, exc.message, where) from None


def unknown_media(value: Any) -> str:
    """The one message for a media that is none of the four, of any type (pops and contact
    events alike), echoing at most 64 characters of it."""
    return f"unknown media {shown(value)} (expected telephone, callback, email, webcollab)"


def _created_at(data: dict[str, Any], now: str | None = None) -> str:
    """The source's time in the wire's one form (UTC, milliseconds, `Z`), or now (`now`: the
    moment its request was taken, the same for every pop of it)."""
    value = data.get("created_at")
    if value is None or value == "":
        return now or utc_now_iso()
    if not isinstance(value, str) or len(value) > 64:
        raise InputError(
            422, "bad_time", "created_at must be an ISO 8601 date and time", "created_at"
        )
    try:
        return iso_utc(parse_time(value))
    except ValueError:
        raise InputError(
            422, "bad_time", f"created_at is not an ISO 8601 time: {shown(value)}", "created_at"
        ) from None


_MEDIA_WORDS = {m.value: m.value for m in Media}  # the usual spelling, taken as it is
# the text fields each media carries (the guide's chapter 3): the others are sent empty, as the
# contact tracker does (a callback has no `source`, an email no `from` or `redirect`)
_CARRIED = {m.value: frozenset(MEDIA_FIELDS[m]) for m in Media}


def normalize_pop(data: Any, now: str | None = None) -> dict[str, Any]:
    """The wire form of an accepted pop: every field present, typed, bounded; id and time set
    (`now`, when given, is the time of a pop that has none)."""
    if data.__class__ is dict:
        pop = _plain_pop(data, now)
        if pop is not None:
            return pop
    return _checked_pop(data, now)


def _plain_pop(data: dict[str, Any], now: str | None = None) -> dict[str, Any] | None:
    """The common pop (known fields, plain strings, whole seconds) in one pass; None for anything
    else, which `_checked_pop` then takes field by field. Same result, refusals come from there."""
    get = data.get
    media = get("media")
    resource = get("resource")
    if not KNOWN.issuperset(data) or media.__class__ is not str or resource.__class__ is not str:
        return None
    media = _MEDIA_WORDS.get(media)
    wait = get("wait_time", 0)
    if media is None or wait.__class__ is not int or not 0 <= wait <= 10**9:
        if wait is not None or media is None:
            return None
        wait = 0
    try:
        resource = validate_resource(resource)
    except ScreenPopError:
        return None
    pop_id = get("id")
    if pop_id.__class__ is not str or not 0 < len(pop_id) <= MAX_ID:
        if pop_id is not None and pop_id != "":
            return None
        pop_id = new_pop_id()
    contact_id = get("contact_id", "")
    if contact_id.__class__ is not str or len(contact_id) > MAX_CONTACT_ID:
        if contact_id is not None:
            return None
        contact_id = ""
    pop = {
        "id": pop_id,
        "media": media,
        "resource": resource,
        "contact_id": contact_id,
        "created_at": _created_at(data, now),
    }
    carried = _CARRIED[media]
    for name in TEXT_FIELDS:
        value = get(name, "")
        if value.__class__ is not str or len(value) > MAX_TEXT:
            if value is not None:
                return None
            value = ""
        pop[name] = value if name in carried else ""
    pop["wait_time"] = wait
    pop["contact_data"] = contact_data_from(get("contact_data"))
    return pop


def _checked_pop(data: Any, now: str | None = None) -> dict[str, Any]:
    """`normalize_pop` field by field: every refusal, with the field at fault."""
    if not isinstance(data, dict):
        raise InputError(400, "not_an_object", "a pop must be a JSON object")
    unknown = [k for k in data if k not in KNOWN]
    if unknown:
        raise InputError(
            422, "unknown_field", f"unknown field {shown(unknown[0])}", unknown[0][:64]
        )
    if "media" not in data:
        raise InputError(422, "missing_field", "media is required", "media")
    try:
        media = Media.parse(data["media"]) if isinstance(data["media"], str) else None
    except ScreenPopError:
        media = None
    if media is None:
        raise InputError(422, "unknown_media", unknown_media(data["media"]), "media")
    if "resource" not in data:
        raise InputError(422, "missing_field", "resource is required", "resource")
    try:
        resource = validate_resource(data["resource"])
    except ScreenPopError as exc:
        raise InputError(422, "invalid_resource", exc.message, "resource") from None
    wait = data.get("wait_time")
    if wait is None:  # absent or null, like every optional field
        wait = 0
    if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0 or wait > 10**9:
        raise InputError(
            422, "wrong_type", "wait_time must be a whole number of seconds ≥ 0", "wait_time"
        )
    pop_id = _text(data, "id", MAX_ID) or new_pop_id()
    pop = {
        "id": pop_id,
        "media": media.value,
        "resource": resource,
        "contact_id": _text(data, "contact_id", MAX_CONTACT_ID),
        "created_at": _created_at(data, now),
    }
    carried = _CARRIED[media.value]
    for name in TEXT_FIELDS:
        value = _text(data, name)  # checked all the same
        pop[name] = value if name in carried else ""
    pop["wait_time"] = int(wait)
    pop["contact_data"] = contact_data_from(data.get("contact_data"))
    return pop


def normalize_pops(body: Any) -> list[dict[str, Any]]:
    """One pop or an array of them; the whole array is checked before any is accepted."""
    items = body if isinstance(body, list) else [body]
    pops = []
    now = utc_now_iso()  # one time for the pops of one request that bring none
    for index, item in enumerate(items):
        try:
            pops.append(normalize_pop(item, now))
        except InputError as exc:
            if isinstance(body, list):
                exc.index = index
                exc.message = f"pop {index}: {exc.message}"
            raise
    return pops
