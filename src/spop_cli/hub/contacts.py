"""Contact lifecycle rules: what a source says happened to a contact becomes screen pops.

Pure logic, no I/O. The hub feeds lifecycle events in (`POST /v1/contacts`) and delivers the
pops that come out; the rules are in docs/contacts.md.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from spop_cli.model import (
    EVENT_CLASSES,
    MAX_CONTACT_ID_LEN,
    MEDIA_FIELDS,
    ContactDataCollection,
    Media,
    ScreenPopError,
    ScreenPopEvent,
    new_pop_id,
    parse_time,
    validate_resource,
)
from spop_cli.pops import DataError, check_contact_data, unknown_media
from spop_cli.protocol import pop_frame, pop_too_large

MAX_EVENT_ID_LEN = 256
MAX_POP_ID_LEN = 128  # as pops.MAX_ID: a pop id derived from an event id must fit it

MAX_TEXT_LEN = 1024
MAX_DATA_KEYS = 256
MAX_DATA_LEN = 4096
MAX_BATCH = 1000

CONTACT_TEXT_FIELDS = ("source", "destination", "queue_name", "contact_description")
TEXT_EVENT_FIELDS = (*CONTACT_TEXT_FIELDS, "from", "redirect")
CONTACT_FIELDS = ("media", *CONTACT_TEXT_FIELDS, "contact_data")
QUEUE_FIELDS = ("queue_name", "contact_description", "contact_data")

# What each event takes besides contact_id, event, at and the contact fields.
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "queued": (),
    "routed": ("resource",),
    "answered": ("resource",),
    "consulted": ("from", "resource"),
    "transferred": ("from", "resource"),
    "conferenced": ("from", "resource"),
    "redirected": ("redirect", "resource"),
    "picked_up": ("resource",),
    "recalled": ("resource",),
    "requeued": (),
    "resumed": ("resource",),
    "invited": ("from", "resource"),
    "ended": (),
}
POP_EVENTS = frozenset(EVENT_FIELDS) - {"queued", "answered", "requeued", "ended"}
CREATING_EVENTS = frozenset({"queued", "routed"})
# After these the contact sits at the event's resource; `from` and `redirect` default to it.
HOLDING_EVENTS = frozenset(
    {"routed", "answered", "transferred", "redirected", "picked_up", "recalled", "resumed"}
)
# The fields each event may carry (any other one, unless null, is refused), computed once.
ALLOWED_FIELDS: dict[str, frozenset[str]] = {
    kind: frozenset(
        {
            "id",
            "contact_id",
            "event",
            "at",
            *(QUEUE_FIELDS if kind == "requeued" else CONTACT_FIELDS),
            *takes,
        }
    )
    for kind, takes in EVENT_FIELDS.items()
}
ONE_SECOND = timedelta(seconds=1)
STATE_VERSION = 1  # of a contact's journalled state (`ContactTracker.state`)

# Contact updates (docs/contacts.md "Updates"): the events that move a contact from the
# resources following it to the event's resource, and the `reason` each change carries.
MOVING_EVENTS = {
    "transferred": "",
    "redirected": "redirected",
    "recalled": "recalled",
    "resumed": "resumed",
}
JOINING_EVENTS = {"conferenced": "joined by", "invited": "invited"}
CHANGES = ("answered", "consulted", "transferred", "conferenced", "requeued", "withdrawn", "ended")


class ContactEventError(Exception):
    """A refused lifecycle event: status 400 when malformed, 422 when it does not apply."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        field: str | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.field = field if field is None or len(field) <= 64 else field[:64]  # never echo more
        self.index = index
        # Outcomes of the events of the same batch accepted before this one.
        self.applied: list[Outcome] = []

    def __str__(self) -> str:
        where = f" (event {self.index})" if self.index is not None else ""
        return f"{self.error}: {self.message}{where}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": self.error,
            "message": self.message,
            "field": self.field,
            "index": self.index,
        }


def _malformed(field: str | None, message: str, error: str = "wrong_type") -> ContactEventError:
    return ContactEventError(400, error, message, field)


def _refused(error: str, field: str | None, message: str) -> ContactEventError:
    return ContactEventError(422, error, message, field)


@dataclass(slots=True)
class Change:
    """One contact update for one resource that was popped for the contact (protocol 2).

    `takes_back`: if that resource's pop is still pending, the hub withdraws it and sends
    `withdrawn` instead (the contact ended, or was answered elsewhere while it rang there)."""

    id: str
    contact_id: str
    media: str
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
    takes_back: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The body of the `change` frame (docs/protocol.md)."""
        return {
            "id": self.id,
            "contact_id": self.contact_id,
            "media": self.media,
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


def change_id_for(event_id: str | None, resource: str) -> str:
    """A change's id: derived from its event's id when it has one (a retried event makes the
    same ids, which the duplicate window then drops), else random."""
    if event_id is None:
        return uuid.uuid4().hex
    digest = hashlib.sha256(f"{event_id}\nchange\n{resource}".encode()).hexdigest()[:32]
    return "sha256:" + digest


@dataclass
class Outcome:
    """What one event produced: pops to deliver, changes, and whether the contact ended."""

    contact_id: str
    pops: list[ScreenPopEvent] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    # each pop's wire form and `pop` frame, made once (the frame's size was checked with them)
    wire: list[tuple[dict[str, Any], bytes]] = field(default_factory=list)
    ended: bool = False
    event_id: str | None = None  # the event's `id`: its pop's id derives from it
    duplicate: bool = False  # an id applied within the window: answered, nothing changed


@dataclass(slots=True)
class _Event:
    """A validated lifecycle event; `None` means the field was not given."""

    contact_id: str
    kind: str
    at: datetime | None
    media: Media | None
    texts: dict[str, str]
    contact_data: dict[str, str] | None
    resource: str
    event_id: str | None = None


@dataclass(slots=True)
class _Contact:
    """What the hub knows of one contact between its events."""

    contact_id: str
    media: Media
    last_at: datetime
    last_seen: datetime  # hub clock, for expiry
    source: str = ""
    destination: str = ""
    queue_name: str = ""
    contact_description: str = ""
    contact_data: dict[str, str] = field(default_factory=dict)
    segment_start: datetime | None = None  # None: never queued (a direct call)
    answered_at: datetime | None = None  # first answer in the current segment
    holder: str = ""  # resource the contact was last routed to or answered at
    ended_seen: datetime | None = None
    # resources following the contact (popped for it, not yet left) → their last pop's id
    following: dict[str, str] = field(default_factory=dict)

    def copy(self) -> _Contact:
        """A copy to change (its dicts too): a tracked contact is never changed in place."""
        return _Contact(
            self.contact_id,
            self.media,
            self.last_at,
            self.last_seen,
            self.source,
            self.destination,
            self.queue_name,
            self.contact_description,
            dict(self.contact_data),
            self.segment_start,
            self.answered_at,
            self.holder,
            self.ended_seen,
            dict(self.following),
        )

    def wait_time(self, at: datetime) -> int:
        """Whole seconds (floored) from segment start to the first answer, or to `at` if none."""
        if self.segment_start is None:
            return 0
        return min(((self.answered_at or at) - self.segment_start) // ONE_SECOND, MAX_SECONDS)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: Any, name: str, limit: int = MAX_TEXT_LEN) -> str:
    if not isinstance(value, str):
        raise _malformed(name, f"{name} must be a string, not {type(value).__name__}")
    if len(value) > limit:
        raise _refused("too_long", name, f"{name} is {len(value)} characters (at most {limit})")
    return value


def _required(event: Mapping[str, Any], name: str) -> Any:
    value = event.get(name)
    if value is None:
        raise _refused("missing_field", name, f"{name} is required")
    return value


def _parse_at(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _malformed("at", f"at must be an ISO 8601 string, not {type(value).__name__}")
    try:
        return parse_time(value)  # the rule of a pop's created_at too
    except ValueError:
        raise _malformed("at", f"at is not an ISO 8601 time: {value[:64]!r}", "bad_time") from None


def _parse_data(value: Any) -> dict[str, str]:
    """The rule /v1/pops applies too (one function); here values must be strings already."""
    try:
        return check_contact_data(value, numbers=False)
    except DataError as exc:
        if exc.error == "wrong_type":
            raise _malformed("contact_data", exc.message) from None
        raise _refused(exc.error, "contact_data", exc.message) from None


def _parse_resource(value: Any) -> str:
    if not isinstance(value, str):
        raise _malformed("resource", f"resource must be a string, not {type(value).__name__}")
    try:
        return validate_resource(value)
    except ScreenPopError as exc:
        raise _refused("invalid_resource", "resource", exc.message) from None


def _parse(event: Any) -> _Event:
    """Check one event's shape and limits; every error names its field."""
    if event.__class__ is not dict and not isinstance(event, Mapping):  # dict: no ABC check
        raise _malformed(None, "a contact event must be a JSON object", "not_an_object")
    contact_id = _text(_required(event, "contact_id"), "contact_id", MAX_CONTACT_ID_LEN)
    if not contact_id.strip():
        raise _refused("missing_field", "contact_id", "contact_id is empty")
    kind = _text(_required(event, "event"), "event")
    if kind not in EVENT_FIELDS:
        known = ", ".join(EVENT_FIELDS)
        raise _refused("unknown_event", "event", f"unknown event {kind[:64]!r} (expected {known})")
    # Requeueing keeps source and destination: the pilot dialled to requeue is not the destination.
    allowed = ALLOWED_FIELDS[kind]
    if not allowed.issuperset(event):  # a field it does not take: refused unless null
        for name, value in event.items():
            if value is not None and name not in allowed:
                raise _refused(
                    "unexpected_field", str(name), f"{kind} does not take {str(name)[:64]!r}"
                )
    texts: dict[str, str] = {}
    for name in TEXT_EVENT_FIELDS:
        value = event.get(name)
        if value is not None:
            texts[name] = (
                value
                if value.__class__ is str and len(value) <= MAX_TEXT_LEN
                else _text(value, name)
            )
    media = None
    if event.get("media") is not None:
        text = _text(event["media"], "media")  # not a string: 400 wrong_type
        try:
            media = Media.parse(text)
        except ScreenPopError:
            raise _refused("unknown_media", "media", unknown_media(text)) from None
    data = _parse_data(event["contact_data"]) if event.get("contact_data") is not None else None
    needs_resource = "resource" in EVENT_FIELDS[kind]
    resource = _parse_resource(_required(event, "resource")) if needs_resource else ""
    event_id = _parse_event_id(event.get("id"))
    return _Event(
        contact_id, kind, _parse_at(event.get("at")), media, texts, data, resource, event_id
    )


def _parse_event_id(value: Any) -> str | None:
    if value is None:
        return None
    event_id = _text(value, "id", MAX_EVENT_ID_LEN)
    if not event_id:
        raise _refused("missing_field", "id", "id is empty (leave it out instead)")
    return event_id


def pop_id_for(event_id: str) -> str:
    """The id of the pop an event with this id makes: the event id itself when it fits a pop id,
    else a digest of it. Stable, so the journal's pop duplicate window also catches an event
    repeated across a hub restart (when the event window, in memory, has been lost)."""
    if len(event_id) <= MAX_POP_ID_LEN:
        return event_id
    return "sha256:" + hashlib.sha256(event_id.encode()).hexdigest()[:32]


MAX_SECONDS = 10**9  # a pop's wait_time at most (pops.py): times years apart give no more
IDS_JOURNALLED = 64  # event ids kept with a contact's journalled state, at most


class EventIds:
    """Ids of events applied within the last `window` seconds (hub clock): a platform retrying a
    webhook, or a source resending a batch whose answer it lost, is applied once."""

    def __init__(self, window: float) -> None:
        self.window = timedelta(seconds=window)
        self._seen: OrderedDict[str, datetime] = OrderedDict()  # id → when applied, oldest first
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, event_id: str, now: datetime) -> bool:
        """True (and counted) when `event_id` was applied less than `window` before `now`."""
        self.expire(now)
        if event_id in self._seen:
            self.duplicates += 1
            return True
        return False

    def add(self, event_id: str, now: datetime) -> None:
        self._seen[event_id] = now
        self._seen.move_to_end(event_id)

    def forget(self, event_id: str) -> None:
        """An applied event whose commit failed: it did not happen, so a resend must apply."""
        self._seen.pop(event_id, None)

    def when(self, event_id: str) -> datetime | None:
        """When `event_id` was applied, while it is remembered."""
        return self._seen.get(event_id)

    def restore(self, applied: Iterable[tuple[str, datetime]]) -> None:
        """Ids journalled with their contacts, back after a restart, oldest first (`expire`
        stops at the first one inside the window)."""
        for event_id, moment in sorted(applied, key=lambda item: item[1]):
            if event_id not in self._seen:
                self._seen[event_id] = moment

    def expire(self, now: datetime) -> None:
        horizon = now - self.window
        seen = self._seen
        while seen:
            first_id, first = next(iter(seen.items()))
            if first > horizon:
                break
            del seen[first_id]


class ContactTracker:
    """Every contact's state, updated event by event; no I/O, no clock of its own."""

    def __init__(
        self,
        forget_after: float = 300.0,
        idle_expiry: float = 4 * 3600.0,
        dedupe_window: float = 120.0,
        max_frame: int | None = None,
    ) -> None:
        if forget_after < 0 or idle_expiry < 0 or dedupe_window < 0:
            raise ValueError("forget_after, idle_expiry and dedupe_window must be >= 0")
        self.forget_after = timedelta(seconds=forget_after)
        self.idle_expiry = timedelta(seconds=idle_expiry)
        self.max_frame = max_frame  # an event whose pop's frame would be longer is refused
        self._contacts: dict[str, _Contact] = {}
        self.event_ids = EventIds(dedupe_window)
        self._ids_of: dict[str, list[str]] = {}  # contact → its event ids, newest last
        # contact → the source inside the hub that started it (journalled with its state), so
        # that source, restarted with the hub, can end the calls that ended meanwhile
        self._origin_of: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._contacts)

    def apply_batch(
        self, events: Any, received_at: datetime, origin: str | None = None
    ) -> list[Outcome]:
        """Apply one event or an array in order; a refusal carries the outcomes before it.
        `origin`: the source inside the hub that sent them (kept for the contacts they start)."""
        if events.__class__ is dict or isinstance(events, Mapping):
            return [self.apply(events, received_at, origin)]
        if not isinstance(events, list | tuple):
            raise _malformed(
                None, "expected an event object or an array of events", "not_an_object"
            )
        if len(events) > MAX_BATCH:
            raise _refused("too_many_events", None, f"{len(events)} events (at most {MAX_BATCH})")
        outcomes: list[Outcome] = []
        for index, event in enumerate(events):
            try:
                outcomes.append(self.apply(event, received_at, origin))
            except ContactEventError as exc:
                exc.index = index
                exc.applied = outcomes
                raise
            except Exception as exc:  # a rule we got wrong: refuse this event, keep the others
                error = ContactEventError(
                    422, "not_applicable", f"event cannot be applied: {exc!r}"[:300]
                )
                error.index = index
                error.applied = outcomes
                raise error from exc
        return outcomes

    def apply(
        self, event: Mapping[str, Any], received_at: datetime, origin: str | None = None
    ) -> Outcome:
        """Apply one event; a refused event changes nothing."""
        parsed = _parse(event)
        seen = _utc(received_at)
        if parsed.event_id is not None and self.event_ids.seen(parsed.event_id, seen):
            return Outcome(parsed.contact_id, event_id=parsed.event_id, duplicate=True)
        at = parsed.at or seen
        contact = self._contacts.get(parsed.contact_id)
        if contact is None:
            contact = self._admit(parsed, at, seen)
        else:
            self._check(contact, parsed, at)
            # changed on a copy, swapped in at the end: a refused event (a pop too large)
            # changes nothing, and the tracked object itself is a snapshot (`snapshot`)
            contact = contact.copy()
        ringing = contact.answered_at is None  # before this event: not answered in its segment
        self._update(contact, parsed, at)
        outcome = Outcome(parsed.contact_id, event_id=parsed.event_id)
        # the event's time as the wire writes it, for its pop and its changes (if any)
        stamp = _iso(at) if parsed.kind in POP_EVENTS or contact.following else ""
        if parsed.kind in POP_EVENTS:
            pop = self._pop(contact, parsed, at, stamp)
            body = pop.to_dict()
            frame = pop_frame(body)
            if self.max_frame is not None:
                why = pop_too_large(frame, self.max_frame)
                if why is not None:
                    raise ContactEventError(413, "pop_too_large", why, "contact_data")
            outcome.pops.append(pop)
            outcome.wire.append((body, frame))
        outcome.changes = self._changes(contact, parsed, at, ringing, stamp)
        if outcome.pops:
            contact.following[parsed.resource] = outcome.pops[0].id
        if parsed.kind in HOLDING_EVENTS:
            contact.holder = parsed.resource
        if parsed.kind == "ended":
            contact.ended_seen = seen
            outcome.ended = True
        contact.last_at = at
        contact.last_seen = seen
        if origin is not None and parsed.contact_id not in self._contacts:
            self._origin_of[parsed.contact_id] = origin
        self._contacts[parsed.contact_id] = contact
        if parsed.event_id is not None:
            self.event_ids.add(parsed.event_id, seen)
            ids = self._ids_of.setdefault(parsed.contact_id, [])
            ids.append(parsed.event_id)
            if len(ids) > 2 * IDS_JOURNALLED:
                del ids[:-IDS_JOURNALLED]
        return outcome

    def expire(self, now: datetime) -> int:
        """Forget contacts ended over forget_after ago or idle for idle_expiry (hub clock)."""
        return len(self.forget_expired(now))

    def forget_expired(self, now: datetime) -> list[str]:
        """Forget contacts ended over forget_after ago or idle for idle_expiry; their ids."""
        now = _utc(now)
        gone = [
            contact_id
            for contact_id, contact in self._contacts.items()
            if now - contact.last_seen >= self.idle_expiry
            or (contact.ended_seen is not None and now - contact.ended_seen >= self.forget_after)
        ]
        for contact_id in gone:
            del self._contacts[contact_id]
            self._ids_of.pop(contact_id, None)
            self._origin_of.pop(contact_id, None)
        self.event_ids.expire(now)
        return gone

    def open_from(self, origin: str) -> list[str]:
        """The contacts not ended that the source `origin` (inside the hub) started."""
        contacts = self._contacts
        return [
            contact_id
            for contact_id, source in self._origin_of.items()
            if source == origin
            and (contact := contacts.get(contact_id)) is not None
            and contact.ended_seen is None
        ]

    def open_states(self, origin: str) -> list[dict[str, Any]]:
        """`state()` of each contact `open_from(origin)` names: what that source, restarted,
        needs to go on with its calls (`source_view`)."""
        return [s for c in self.open_from(origin) if (s := self.state(c)) is not None]

    # -- persistence: the journal keeps each contact's whole state, the hub restores it -------
    def state(self, contact_id: str) -> dict[str, Any] | None:
        """Everything known of one contact, as JSON-ready values; None if it is not tracked."""
        contact = self._contacts.get(contact_id)
        if contact is None:
            return None
        state = _state(contact)
        state["contact_data"] = dict(contact.contact_data)
        state["following"] = dict(contact.following)
        if contact_id in self._origin_of:
            state["origin"] = self._origin_of[contact_id]
        for name in _TIMES:
            moment = state[name]
            if moment is not None:
                state[name] = moment.isoformat()
        return state

    def state_json(self, contact_id: str) -> bytes | None:
        """`state()` as JSON, the journal's row, made without the copies (orjson writes a
        datetime as `isoformat()` does), with `event_ids`: the contact's event ids still in the
        duplicate window and when each was applied, so that after a crash a source resending a
        batch whose answer it lost is answered as applied, not refused (`contact_ended`)."""
        contact = self._contacts.get(contact_id)
        if contact is None:
            return None
        state = _state(contact)
        when = self.event_ids.when
        recent = [
            (event_id, moment)
            for event_id in self._ids_of.get(contact_id, ())[-IDS_JOURNALLED:]
            if (moment := when(event_id)) is not None
        ]
        if recent:
            state["event_ids"] = recent
        if contact_id in self._origin_of:
            state["origin"] = self._origin_of[contact_id]
        return orjson.dumps(state)

    def restore_event_ids(self, states: Iterable[Mapping[str, Any]]) -> None:
        """The `event_ids` journalled with these contacts (`state_json`), remembered again."""
        applied = []
        for state in states:
            for item in state.get("event_ids") or ():
                if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
                    applied.append((item[0], datetime.fromisoformat(item[1])))
                    self._ids_of.setdefault(state["contact_id"], []).append(item[0])
        self.event_ids.restore(applied)

    def restore(self, state: Mapping[str, Any]) -> str:
        """Track a contact again from `state()`'s output (after a restart); its id."""
        values: dict[str, Any] = {}
        for item in fields(_Contact):
            if item.name not in state:
                continue
            value = state[item.name]
            if value is not None and "datetime" in str(item.type):
                value = datetime.fromisoformat(value)
            elif item.name == "media":
                value = Media(value)
            elif item.name in ("contact_data", "following"):
                value = dict(value)
            values[item.name] = value
        contact = _Contact(**values)
        self._contacts[contact.contact_id] = contact
        if isinstance(state.get("origin"), str):
            self._origin_of[contact.contact_id] = state["origin"]
        return contact.contact_id

    def snapshot(self, contact_ids: Iterable[str]) -> dict[str, _Contact | None]:
        """These contacts as they are now, to put back if a change is not committed. No copies:
        `apply` changes a copy of a contact and swaps it in, never the tracked object."""
        contacts = self._contacts
        return {contact_id: contacts.get(contact_id) for contact_id in contact_ids}

    def put_back(self, snapshot: Mapping[str, _Contact | None]) -> None:
        """Undo every change since `snapshot` for its contacts (a refused commit)."""
        for contact_id, contact in snapshot.items():
            if contact is None:
                self._contacts.pop(contact_id, None)
                self._origin_of.pop(contact_id, None)
            else:
                self._contacts[contact_id] = contact

    @staticmethod
    def _admit(parsed: _Event, at: datetime, seen: datetime) -> _Contact:
        if parsed.kind not in CREATING_EVENTS:
            raise _refused(
                "unknown_contact",
                "contact_id",
                f"no contact {parsed.contact_id[:64]!r}: start it with queued or routed",
            )
        _check_data_size({}, parsed)
        return _Contact(parsed.contact_id, parsed.media or Media.telephone, at, seen)

    @staticmethod
    def _check(contact: _Contact, parsed: _Event, at: datetime) -> None:
        if contact.ended_seen is not None:
            raise _refused("contact_ended", "event", f"contact {contact.contact_id!r} has ended")
        if at < contact.last_at:
            raise _refused(
                "time_backwards",
                "at",
                f"{_iso(at)} is before the contact's last event {_iso(contact.last_at)}",
            )
        if parsed.media is not None and parsed.media is not contact.media:
            raise _refused(
                "media_mismatch", "media", f"contact is {contact.media}, not {parsed.media}"
            )
        _check_data_size({} if parsed.kind == "requeued" else contact.contact_data, parsed)

    @staticmethod
    def _update(contact: _Contact, parsed: _Event, at: datetime) -> None:
        if parsed.kind == "requeued":
            contact.queue_name = ""
            contact.contact_description = ""
            contact.contact_data = {}
        for name in CONTACT_TEXT_FIELDS:
            if name in parsed.texts:
                setattr(contact, name, parsed.texts[name])
        if parsed.contact_data is not None:
            contact.contact_data.update(parsed.contact_data)
        # A contact still waiting keeps its wait when queued again (overflow, a resent event).
        starts_segment = parsed.kind == "requeued" or (
            parsed.kind == "queued"
            and (contact.segment_start is None or contact.answered_at is not None)
        )
        if starts_segment:
            contact.segment_start = at
            contact.answered_at = None
        elif parsed.kind == "answered" and contact.answered_at is None:
            contact.answered_at = at

    @staticmethod
    def _changes(
        contact: _Contact, parsed: _Event, at: datetime, ringing: bool, stamp: str
    ) -> list[Change]:
        """The updates this event makes for the resources following the contact (the table in
        docs/contacts.md "Updates"); those the contact leaves stop following it. `stamp`: `at`
        as the wire writes it."""
        following = contact.following
        kind, target = parsed.kind, parsed.resource
        if not following or kind in ("queued", "routed"):
            return []
        wait = contact.wait_time(at)
        out: list[Change] = []
        leaving: list[str] = []

        def add(resource: str, change: str, **values: Any) -> None:
            out.append(
                Change(
                    change_id_for(parsed.event_id, resource),
                    contact.contact_id,
                    contact.media._value_,  # `.value` is a Python-level property call
                    resource,
                    following[resource],
                    change,
                    stamp,
                    wait_time=wait,
                    **values,
                )
            )

        for resource in following:
            if kind == "answered":
                if resource == target:
                    add(resource, "answered", answered_by=target)
                elif ringing:  # ringall: the others' contact went elsewhere
                    add(
                        resource,
                        "answered",
                        answered_by=target,
                        reason="answered elsewhere",
                        takes_back=True,
                    )
                    leaving.append(resource)
                else:  # a consultation or conference party answered
                    add(resource, "answered", answered_by=target)
            elif resource == target:
                continue  # this event pops it again: the pop says it all
            elif kind == "picked_up":
                add(resource, "answered", answered_by=target, reason="picked up", takes_back=True)
                leaving.append(resource)
            elif kind == "consulted":
                add(resource, "consulted", consulted=target)
            elif kind in JOINING_EVENTS:
                add(resource, "conferenced", reason=f"{JOINING_EVENTS[kind]} {target}")
            elif kind in MOVING_EVENTS:
                add(resource, "transferred", transferred_to=target, reason=MOVING_EVENTS[kind])
                leaving.append(resource)
            elif kind == "requeued":
                add(resource, "requeued", reason=contact.queue_name)
                leaving.append(resource)
            elif kind == "ended":
                answered = contact.answered_at
                talk = (at - answered) // ONE_SECOND if answered is not None else 0
                abandoned = answered is None and contact.segment_start is not None
                add(
                    resource,
                    "ended",
                    talk_time=min(max(talk, 0), MAX_SECONDS),
                    reason="abandoned" if abandoned else "",
                    takes_back=True,
                )
                leaving.append(resource)
        for resource in leaving:
            del following[resource]
        return out

    @staticmethod
    def _pop(contact: _Contact, parsed: _Event, at: datetime, stamp: str) -> ScreenPopEvent:
        """The event's pop; its id derives from the event's id when it has one, else random."""
        values = {
            "source": contact.source,
            "destination": contact.destination,
            "queue_name": contact.queue_name,
            "contact_description": contact.contact_description,
            "from": "",
            "redirect": "",
        }
        if "from" in EVENT_FIELDS[parsed.kind]:
            values["from"] = parsed.texts.get("from", contact.holder)
        if parsed.kind == "redirected":
            values["redirect"] = parsed.texts.get("redirect", contact.holder)
        kept = MEDIA_FIELDS[contact.media]
        values = {name: (value if name in kept else "") for name, value in values.items()}
        return EVENT_CLASSES[contact.media](
            media=contact.media,
            resource=parsed.resource,
            id=new_pop_id() if parsed.event_id is None else pop_id_for(parsed.event_id),
            contact_id=contact.contact_id,
            created_at=stamp,
            source=values["source"],
            destination=values["destination"],
            queue_name=values["queue_name"],
            contact_description=values["contact_description"],
            from_=values["from"],
            redirect=values["redirect"],
            wait_time=contact.wait_time(at),
            contact_data=ContactDataCollection(contact.contact_data),
        )


_TIMES = ("last_at", "last_seen", "segment_start", "answered_at", "ended_seen")


#: what a source learns of each of its open contacts (`open_contacts`): when the hub last
#: heard of it, its queue segment, who it rang in this round and who answered (no contact data)
SOURCE_VIEW = ("contact_id", "media", "last_at", "segment_start", "answered_at", "holder")


def source_view(state: Mapping[str, Any]) -> dict[str, Any]:
    """A contact's state (`ContactTracker.state`, or a cluster's stored state) as the
    `open_contacts` answer gives it: times as ISO text, `following` as a list of resources."""
    view = {name: state.get(name) for name in SOURCE_VIEW}
    view["following"] = sorted(state.get("following") or ())
    return view


def _state(contact: _Contact) -> dict[str, Any]:
    """A contact's journalled state, datetimes and dicts as they are (the fields of `_Contact`
    in order, after the state's version)."""
    return {
        "v": STATE_VERSION,
        "contact_id": contact.contact_id,
        "media": contact.media._value_,
        "last_at": contact.last_at,
        "last_seen": contact.last_seen,
        "source": contact.source,
        "destination": contact.destination,
        "queue_name": contact.queue_name,
        "contact_description": contact.contact_description,
        "contact_data": contact.contact_data,
        "segment_start": contact.segment_start,
        "answered_at": contact.answered_at,
        "holder": contact.holder,
        "ended_seen": contact.ended_seen,
        "following": contact.following,
    }


def _check_data_size(current: Mapping[str, str], parsed: _Event) -> None:
    """Refuse, before any change, an event whose contact_data would grow past the limit."""
    if parsed.contact_data is None:
        return
    total = len(current.keys() | parsed.contact_data.keys())
    if total > MAX_DATA_KEYS:
        raise _refused(
            "too_many_keys",
            "contact_data",
            f"contact would hold {total} keys (at most {MAX_DATA_KEYS})",
        )
