"""The vendor's object model as pure data: media, pops, contact data, statuses and errors."""

from __future__ import annotations

import enum
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


class ListenerStatus(enum.Enum):
    """The vendor's enListenerStatus, names kept."""

    Status_Down = "Status_Down"
    Status_Idle = "Status_Idle"
    Status_Up = "Status_Up"
    Status_Reconnecting = "Status_Reconnecting"
    Status_Unknown = "Status_Unknown"

    def __str__(self) -> str:
        return self._value_  # the plain attribute: `.value` is a Python-level property call


class Error(enum.Enum):
    """The vendor's error enumeration; the names travel on the wire and in CLI output."""

    SCREENPOP_Already_Registered = "SCREENPOP_Already_Registered"
    SCREENPOP_Cannot_Create_Diags = "SCREENPOP_Cannot_Create_Diags"
    SCREENPOP_Cannot_Find_HiPath_ProCenter = "SCREENPOP_Cannot_Find_HiPath_ProCenter"
    SCREENPOP_Cannot_Register = "SCREENPOP_Cannot_Register"
    SCREENPOP_Framework_Error = "SCREENPOP_Framework_Error"
    SCREENPOP_Initialization_Error = "SCREENPOP_Initialization_Error"
    SCREENPOP_Memory_Allocation_Error = "SCREENPOP_Memory_Allocation_Error"
    SCREENPOP_Wrong_Key = "SCREENPOP_Wrong_Key"
    SCREENPOP_Wrong_Status = "SCREENPOP_Wrong_Status"

    def __str__(self) -> str:
        return self._value_  # the plain attribute: `.value` is a Python-level property call


class ScreenPopError(Exception):
    """An error with one of the vendor's codes; `.code` is an `Error`."""

    def __init__(self, code: Error, message: str = "") -> None:
        self.code = code
        self.message = message or code.value
        super().__init__(f"{code.value}: {self.message}" if message else code.value)

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


class Media(enum.Enum):
    """The four media; the value is the CLI and wire word."""

    telephone = "telephone"
    callback = "callback"
    email = "email"
    webcollab = "webcollab"

    def __str__(self) -> str:
        return self._value_  # the plain attribute: `.value` is a Python-level property call

    @classmethod
    def parse(cls, word: str) -> Media:
        """The word in any ASCII case, surrounding spaces trimmed (MEDIA_PATTERN says the same)."""
        try:
            text = str(word).strip(" ")
            if not text.isascii():  # str.lower() folds e.g. the Kelvin sign into "k"
                raise ValueError(text)
            return cls(text.lower())
        except ValueError:
            known = ", ".join(m.value for m in cls)
            raise ScreenPopError(
                Error.SCREENPOP_Framework_Error, f"unknown media {word!r} (expected one of {known})"
            ) from None


# Text fields each media carries (the guide's chapter 3; docs/python-api.md), besides resource, wait_time and contact_data.
MEDIA_FIELDS: dict[Media, tuple[str, ...]] = {
    Media.telephone: (
        "source",
        "destination",
        "queue_name",
        "contact_description",
        "from",
        "redirect",
    ),
    Media.callback: ("destination", "queue_name", "contact_description"),
    Media.email: ("source", "destination", "queue_name", "contact_description"),
    Media.webcollab: ("source", "destination", "queue_name", "contact_description"),
}
TEXT_FIELDS: tuple[str, ...] = (
    "source",
    "destination",
    "queue_name",
    "contact_description",
    "from",
    "redirect",
)
MAX_RESOURCE_LEN = 128
MAX_ID_LEN = 128  # a pop id a source gives
MAX_CONTACT_ID_LEN = 256  # a contact id, on /v1/contacts and on a pop


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c}]" for c in word)


# The one definition of a media word on the wire (docs/protocol.md "Media and resources"; the
# OpenAPI `Media` pattern is this text, a test keeps them equal): ASCII, any case, spaces around.
# `(?![\s\S])` ends both patterns, not `$`: in Python's re (and so in Python JSON Schema
# validators) `$` also matches before a final newline.
END = r"(?![\s\S])"
MEDIA_PATTERN = "^ *(?:" + "|".join(_any_case(m.value) for m in Media) + ") *" + END

# Characters a resource may not hold anywhere: controls, characters that print as nothing or
# as a space (a resource differing only by one would be another key: pops for nobody),
# surrogates, private use. Explicit ranges, so every client checks exactly what the hub checks,
# whatever its Unicode version (unassigned code points are therefore allowed).
RESOURCE_REFUSED = (
    "\u0000-\u001f\u007f-\u00a0\u00ad"  # C0, DEL, C1, no-break space, soft hyphen
    "\u061c\u1680\u180e"  # Arabic letter mark, Ogham space, Mongolian vowel separator
    "\u2000-\u200f\u2028-\u202f\u205f-\u206f"  # spaces, zero-width, bidi marks, separators
    "\u3000\ud800-\udfff\ue000-\uf8ff\ufeff\ufff0-\uffff"  # ideographic space … specials
    "\U000e0000-\U000e007f\U000f0000-\U0010ffff"  # tags, supplementary private use
)
# 1-128 characters once surrounding spaces (U+0020) are trimmed, none of them refused.
RESOURCE_PATTERN = (
    f"^ *[^{RESOURCE_REFUSED} ](?:[^{RESOURCE_REFUSED}]{{0,{MAX_RESOURCE_LEN - 2}}}"
    f"[^{RESOURCE_REFUSED} ])? *{END}"
)
_REFUSED_CHAR = re.compile(f"[{RESOURCE_REFUSED}]")


def validate_resource(resource: Any) -> str:
    """An extension or user ID as RESOURCE_PATTERN defines it, trimmed; the one check of both
    ports (register, publish, /v1/pops, /v1/contacts) and of the listeners."""
    if not isinstance(resource, str):
        raise ScreenPopError(Error.SCREENPOP_Cannot_Register, "resource must be a string")
    text = resource.strip(" ")
    if not text:
        raise ScreenPopError(Error.SCREENPOP_Cannot_Register, "resource is empty")
    if len(text) > MAX_RESOURCE_LEN:
        raise ScreenPopError(
            Error.SCREENPOP_Cannot_Register,
            f"resource is {len(text)} characters long (at most {MAX_RESOURCE_LEN})",
        )
    refused = _REFUSED_CHAR.search(text)
    if refused is not None:
        raise ScreenPopError(
            Error.SCREENPOP_Cannot_Register,
            f"resource has control characters, invisible or private-use ones"
            f" (U+{ord(refused.group()):04X} at {refused.start()})",
        )
    return text


def parse_time(value: str) -> datetime:
    """An ISO 8601 date and time (`Z` or an offset; none means UTC), as a UTC datetime.
    Raises ValueError. The rule of `created_at` on pops and `at` on contact events."""
    try:
        # RFC 3339 allows a lowercase `t` and `z`; Python's parser does not
        moment = datetime.fromisoformat(value.upper())
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:  # year 1 with an offset overflows on conversion
        raise ValueError(value) from None


def iso_utc(moment: datetime) -> str:
    """A UTC time as the wire carries it: `2024-05-14T09:00:10.000Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ContactDataItem:
    """One read-only (key, value) pair attached to a contact."""

    key: str
    value: str


class ContactDataCollection:
    """Ordered key/value pairs: iterate in order, `len()`, lookup by key."""

    __slots__ = ("_items",)

    def __init__(self, pairs: Mapping[str, str] | Iterable[tuple[str, str]] | None = None) -> None:
        items: dict[str, str] = {}
        if pairs:
            if pairs.__class__ is dict and all(
                k.__class__ is str and v.__class__ is str for k, v in pairs.items()
            ):
                items = dict(pairs)  # a pop's, as the hub sends it: strings already
            else:
                source = pairs.items() if isinstance(pairs, Mapping) else pairs
                for key, value in source:
                    items[str(key)] = "" if value is None else str(value)
        self._items = items

    def __iter__(self) -> Iterator[ContactDataItem]:
        return (ContactDataItem(k, v) for k, v in self._items.items())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __getitem__(self, key: str) -> str:
        try:
            return self._items[key]
        except KeyError:
            raise ScreenPopError(
                Error.SCREENPOP_Wrong_Key, f"no contact data key {key!r}"
            ) from None

    def item(self, key: str) -> ContactDataItem:
        return ContactDataItem(key, self[key])

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._items.get(key, default)

    def keys(self) -> list[str]:
        return list(self._items)

    def to_dict(self) -> dict[str, str]:
        return dict(self._items)

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """(key, value) in order, without an item object each."""
        return tuple(self._items.items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ContactDataCollection):
            return list(self._items.items()) == list(other._items.items())
        if isinstance(other, Mapping):
            return list(self._items.items()) == [(str(k), str(v)) for k, v in other.items()]
        return NotImplemented

    def __repr__(self) -> str:
        return f"ContactDataCollection({list(self._items.items())!r})"


def new_pop_id() -> str:
    return uuid.uuid4().hex


_last_iso: tuple[int, str] = (0, "")
_last_second: tuple[int, str] = (-1, "")


def utc_now_iso() -> str:
    """Now, UTC, to the millisecond; the date and time formatted once per second, the
    milliseconds appended (a pop a millisecond apart from the last is the usual case)."""
    global _last_iso, _last_second
    now_ms = time.time_ns() // 1_000_000
    if _last_iso[0] != now_ms:
        second, ms = divmod(now_ms, 1000)
        if _last_second[0] != second:
            moment = datetime.fromtimestamp(second, UTC)
            _last_second = (second, moment.isoformat(timespec="seconds").removesuffix("+00:00"))
        _last_iso = (now_ms, f"{_last_second[1]}.{ms:03d}Z")
    return _last_iso[1]


@dataclass(slots=True)
class ScreenPopEvent:
    """A pop as a listener receives it. Subclasses name the vendor's four event objects."""

    media: Media
    resource: str
    id: str = field(default_factory=new_pop_id)
    contact_id: str = ""
    created_at: str = field(default_factory=utc_now_iso)
    source: str = ""
    destination: str = ""
    queue_name: str = ""
    contact_description: str = ""
    from_: str = ""
    redirect: str = ""
    wait_time: int = 0
    contact_data: ContactDataCollection = field(default_factory=ContactDataCollection)

    @property
    def extension(self) -> str:
        return self.resource

    @property
    def user_id(self) -> str:
        return self.resource

    def to_dict(self) -> dict[str, Any]:
        """The wire/JSON form: snake_case, `from` not `from_`, every text field a string."""
        return {
            "id": self.id,
            "media": self.media._value_,
            "resource": self.resource,
            "contact_id": self.contact_id,
            "created_at": self.created_at,
            "source": self.source,
            "destination": self.destination,
            "queue_name": self.queue_name,
            "contact_description": self.contact_description,
            "from": self.from_,
            "redirect": self.redirect,
            "wait_time": self.wait_time,
            "contact_data": self.contact_data.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScreenPopEvent:
        """Build the media's event class from a validated wire dict."""
        word = data["media"]
        media = _MEDIA_WORDS.get(word) if word.__class__ is str else None
        if media is None:
            media = Media.parse(word)
        event_cls = EVENT_CLASSES[media]
        return event_cls(
            media=media,
            resource=str(data["resource"]),
            id=str(data.get("id") or new_pop_id()),
            contact_id=str(data.get("contact_id") or ""),
            created_at=str(data.get("created_at") or utc_now_iso()),
            source=str(data.get("source") or ""),
            destination=str(data.get("destination") or ""),
            queue_name=str(data.get("queue_name") or ""),
            contact_description=str(data.get("contact_description") or ""),
            from_=str(data.get("from") or ""),
            redirect=str(data.get("redirect") or ""),
            wait_time=int(data.get("wait_time") or 0),
            contact_data=ContactDataCollection(data.get("contact_data") or {}),
        )


_MEDIA_WORDS = {m.value: m for m in Media}  # the wire's words, as the hub sends them


class ScreenPopTelephoneEvent(ScreenPopEvent):
    __slots__ = ()


class ScreenPopCallbackEvent(ScreenPopEvent):
    __slots__ = ()


class ScreenPopEmailEvent(ScreenPopEvent):
    __slots__ = ()


class ScreenPopWebCollaborationEvent(ScreenPopEvent):
    __slots__ = ()


EVENT_CLASSES: dict[Media, type[ScreenPopEvent]] = {
    Media.telephone: ScreenPopTelephoneEvent,
    Media.callback: ScreenPopCallbackEvent,
    Media.email: ScreenPopEmailEvent,
    Media.webcollab: ScreenPopWebCollaborationEvent,
}


@dataclass(frozen=True, slots=True)
class StatusChangedEvent:
    """The vendor's StatusChangedEventArgs: the old and the new status."""

    old: ListenerStatus
    new: ListenerStatus


CHANGE_KINDS = (
    "answered",
    "consulted",
    "transferred",
    "conferenced",
    "requeued",
    "withdrawn",
    "ended",
)


@dataclass(frozen=True, slots=True)
class ContactChange:
    """A change to a contact this listener was popped for (protocol 2, docs/protocol.md):
    answered here or elsewhere, consulted, transferred away, conferenced, requeued, withdrawn,
    ended. Strings are empty when unset; times are whole seconds."""

    id: str
    contact_id: str
    media: Media
    resource: str
    pop_id: str
    change: str
    at: str
    answered_by: str = ""
    transferred_to: str = ""
    consulted: str = ""
    talk_time: int = 0
    wait_time: int = 0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The wire/JSON form, as the hub sent it."""
        return {
            "id": self.id,
            "contact_id": self.contact_id,
            "media": self.media._value_,
            "resource": self.resource,
            "pop_id": self.pop_id,
            "change": self.change,
            "at": self.at,
            "answered_by": self.answered_by,
            "transferred_to": self.transferred_to,
            "consulted": self.consulted,
            "talk_time": self.talk_time,
            "wait_time": self.wait_time,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContactChange:
        """From a `change` frame's body; raises KeyError/ValueError on one that is not."""
        change = str(data["change"])
        if change not in CHANGE_KINDS:
            raise ValueError(f"unknown change {change[:64]!r}")
        return cls(
            id=str(data["id"]),
            contact_id=str(data.get("contact_id") or ""),
            media=Media.parse(data["media"]),
            resource=str(data["resource"]),
            pop_id=str(data.get("pop_id") or ""),
            change=change,
            at=str(data.get("at") or ""),
            answered_by=str(data.get("answered_by") or ""),
            transferred_to=str(data.get("transferred_to") or ""),
            consulted=str(data.get("consulted") or ""),
            talk_time=int(data.get("talk_time") or 0),
            wait_time=int(data.get("wait_time") or 0),
            reason=str(data.get("reason") or ""),
        )
