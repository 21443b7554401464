"""Checking a pop a source sends (HTTP or `publish` frame) before the hub accepts it. Pure."""

from __future__ import annotations

from typing import Any

from .model import TEXT_FIELDS, Media, ScreenPopError, new_pop_id, utc_now_iso, validate_resource
from .protocol import shown

MAX_TEXT = 1024
MAX_DATA_ITEMS = 256
MAX_DATA_TEXT = 4096
MAX_ID = 128
MAX_CONTACT_ID = 256  # as hub/contacts.py: a tracked contact may also be popped directly
KNOWN = frozenset(
    {"id", "media", "resource", "contact_id", "created_at", "wait_time", "contact_data", *TEXT_FIELDS}
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


def contact_data_from(value: Any, field: str = "contact_data") -> dict[str, str]:
    """An object of string keys to scalar values, order kept, bounded."""
    if value is None:
        return {}
    if value.__class__ is dict and len(value) <= MAX_DATA_ITEMS:
        # the common case: short string keys and values, taken as they are
        for key, item in value.items():
            if item.__class__ is not str or not key or len(key) > MAX_DATA_TEXT or len(item) > MAX_DATA_TEXT:
                break
        else:
            return value
    if not isinstance(value, dict):
        raise InputError(422, "wrong_type", f"{field} must be an object of key/value strings", field)
    if len(value) > MAX_DATA_ITEMS:
        raise InputError(422, "too_long", f"{field} has more than {MAX_DATA_ITEMS} keys", field)
    data: dict[str, str] = {}
    for key, item in value.items():
        where = f"{field}.{key}"
        if not key or len(key) > MAX_DATA_TEXT:
            raise InputError(422, "wrong_key", f"{field} has an empty or oversize key", field)
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise InputError(422, "wrong_type", f"{where} must be a string", where)
        text = str(item)
        if len(text) > MAX_DATA_TEXT:
            raise InputError(422, "too_long", f"{where} is longer than {MAX_DATA_TEXT}", where)
        data[key] = text
    return data


def normalize_pop(data: Any) -> dict[str, Any]:
    """The wire form of an accepted pop: every field present, typed, bounded; id and time set."""
    if not isinstance(data, dict):
        raise InputError(400, "not_an_object", "a pop must be a JSON object")
    unknown = [k for k in data if k not in KNOWN]
    if unknown:
        raise InputError(422, "unknown_field", f"unknown field {shown(unknown[0])}", unknown[0][:64])
    if "media" not in data:
        raise InputError(422, "missing_field", "media is required", "media")
    try:
        media = Media.parse(data["media"]) if isinstance(data["media"], str) else None
    except ScreenPopError:
        media = None
    if media is None:
        raise InputError(
            422,
            "unknown_media",
            f"unknown media {shown(data['media'])} (expected telephone, callback, email, webcollab)",
            "media",
        )
    if "resource" not in data:
        raise InputError(422, "missing_field", "resource is required", "resource")
    try:
        resource = validate_resource(data["resource"])
    except ScreenPopError as exc:
        raise InputError(422, "invalid_resource", exc.message, "resource") from None
    wait = data.get("wait_time", 0)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0 or wait > 10**9:
        raise InputError(422, "wrong_type", "wait_time must be a whole number of seconds ≥ 0", "wait_time")
    pop_id = _text(data, "id", MAX_ID) or new_pop_id()
    pop = {
        "id": pop_id,
        "media": media.value,
        "resource": resource,
        "contact_id": _text(data, "contact_id", MAX_CONTACT_ID),
        "created_at": _text(data, "created_at", 64) or utc_now_iso(),
    }
    for name in TEXT_FIELDS:
        pop[name] = _text(data, name)
    pop["wait_time"] = int(wait)
    pop["contact_data"] = contact_data_from(data.get("contact_data"))
    return pop


def normalize_pops(body: Any) -> list[dict[str, Any]]:
    """One pop or an array of them; the whole array is checked before any is accepted."""
    items = body if isinstance(body, list) else [body]
    pops = []
    for index, item in enumerate(items):
        try:
            pops.append(normalize_pop(item))
        except InputError as exc:
            if isinstance(body, list):
                exc.index = index
                exc.message = f"pop {index}: {exc.message}"
            raise
    return pops
