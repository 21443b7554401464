"""Asterisk AMI events in, contact lifecycle events out: one small state machine per call, keyed by
the call's `Linkedid`. Pure: no socket, no clock (the caller gives each event's time), so it is
tested against the recorded stream row by row. docs/sources/asterisk.md has the mapping table.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..pops import MAX_DATA_ITEMS, MAX_DATA_TEXT, MAX_TEXT

#: Interface / channel name -> agent resource, tried in order; the first group is the resource.
DEFAULT_AGENT_PATTERNS = (
    r"^(?:PJSIP|SIP|IAX2|DAHDI|Skinny|SCCP)/([^-/;@]+)",  # PJSIP/1001, SIP/1001-0000002a
    r"^Local/([^@/;]+)@",  # Local/1001@from-queue/n, Local/100@agents-00000001;1
)
#: contexts where calls from outside start (FreePBX: from-trunk, from-pstn)
DEFAULT_INBOUND_CONTEXTS = ("from-pstn", "from-trunk", "from-external")
GONE_KEPT = 10_000  # Uniqueids remembered after their Hangup (a late NewCallerid follows some)
UNKNOWN = {"", "<unknown>", "<Unknown>"}

#: the AMI events the mapping reads (the rest can be filtered out by Asterisk)
EVENTS = (
    "Newchannel",
    "Hangup",
    "VarSet",
    "UserEvent",
    "QueueCallerJoin",
    "QueueCallerLeave",
    "QueueCallerAbandon",
    "AgentCalled",
    "AgentConnect",
    "AgentRingNoAnswer",
    "DialBegin",
    "DialEnd",
    "Hold",
    "Unhold",
    "BlindTransfer",
    "AttendedTransfer",
    "Pickup",
)


@dataclass
class MapConfig:
    """Every part of the mapping a deployment may need to change; defaults fit stock Asterisk and FreePBX."""

    pop_on: str = "ring"  # "ring": pop each agent rung; "answer": pop only the agent who answers
    agent_patterns: tuple[str, ...] = DEFAULT_AGENT_PATTERNS
    resource_names: Mapping[str, str] = field(default_factory=dict)  # pattern result -> resource
    queue_names: Mapping[str, str] = field(default_factory=dict)  # Asterisk queue -> shown name
    inbound_contexts: tuple[str, ...] = DEFAULT_INBOUND_CONTEXTS  # empty: every call is inbound
    internal_calls: bool = False  # pop calls that did not come in through an inbound context
    variable_prefix: str = "SPOP_"
    user_event: str = "SpopData"
    caller_name_key: str = "caller_name"  # contact_data key of the caller's name; "" leaves it out
    data_keys: Mapping[str, str] = field(default_factory=dict)  # rename data keys (vars, headers)

    def __post_init__(self) -> None:
        self._patterns = [re.compile(p) for p in self.agent_patterns]

    def resource(self, name: str) -> str | None:
        """The agent resource an Interface or channel name stands for, or None."""
        for pattern in self._patterns:
            match = pattern.search(name)
            if match:
                found = match.group(1) if match.groups() else match.group(0)
                return self.resource_names.get(found, found)
        return None

    def queue(self, name: str) -> str:
        return self.queue_names.get(name, name)


# UserEvent headers that are Asterisk's own, not data the dialplan attached
_CHANNEL_HEADERS = frozenset(
    [
        "Event",
        "Privilege",
        "Channel",
        "ChannelState",
        "ChannelStateDesc",
        "CallerIDNum",
        "CallerIDName",
        "ConnectedLineNum",
        "ConnectedLineName",
        "Language",
        "AccountCode",
        "Context",
        "Exten",
        "Priority",
        "Uniqueid",
        "Linkedid",
        "UserEvent",
        "ActionID",
        "Timestamp",
        "SystemName",
    ]
)


def _base(channel: str) -> str:
    """`Local/100@agents-00000001;1` and `;2` are two halves of one leg: the same base."""
    return channel.rsplit(";", 1)[0] if channel.startswith("Local/") else channel


def _known(value: str | None) -> str:
    return "" if value is None or value in UNKNOWN else value


@dataclass
class Call:
    """What spop knows of one call (one Linkedid)."""

    linkedid: str
    channels: set[str] = field(default_factory=set)  # live Uniqueids
    inbound: bool = False
    first_context: str = ""
    caller: str = ""
    caller_name: str = ""
    dnid: str = ""
    description: str = ""
    data: dict[str, str] = field(default_factory=dict)
    queue: str = ""  # the queue the caller waits in now ("" once out of it)
    last_queue: str = ""
    abandoned_from: str = ""  # left a queue without answer (AMI Redirect shows as an abandon)
    started: bool = False  # the hub knows the contact (queued or routed sent)
    ended: bool = False
    holder: str = ""  # resource that answered and has the call
    holder_leg: str = ""
    transfer_from: str = ""  # set by a transfer until the next agent answers
    redirect_from: str = ""
    consulted: set[str] = field(default_factory=set)
    legs: list[str] = field(default_factory=list)  # agent legs' base names (to forget at the end)
    on_hold: bool = False
    offers: dict[str, dict[str, Any]] = field(default_factory=dict)  # resource -> offer not popped
    rung: set[str] = field(default_factory=set)  # resources popped in this offer round
    no_answer: set[str] = field(default_factory=set)  # rung and not answered (AgentRingNoAnswer)
    sent_fields: dict[str, Any] = field(default_factory=dict)
    last_at: datetime | None = None
    queued_at: datetime | None = None
    unlisted: bool = False  # seeded from the hub's state, not yet in a list of calls (resync)


class AsteriskMapper:
    """Feed it AMI events (dicts) with their time; it returns lifecycle events for the hub."""

    def __init__(self, config: MapConfig | None = None) -> None:
        self.config = config or MapConfig()
        self.calls: dict[str, Call] = {}
        self.channel_call: dict[str, str] = {}  # Uniqueid -> Linkedid
        self.legs: dict[str, tuple[str, str]] = {}  # agent leg base name -> (Linkedid, resource)
        self.stale: set[str] = set()  # channels known before a reconnect, not yet confirmed
        # recently hung-up Uniqueids: late events (a NewCallerid after the Hangup) must not revive them
        self.gone: OrderedDict[str, None] = OrderedDict()
        self.direct: set[str] = set()  # legs dialled outside a queue (answered by their DialEnd)
        # the hub's state of a contact, when this source restarts with it (in `spop serve`): a
        # call in progress it does not know may be one the hub does (restored from its journal)
        self.known: Callable[[str], Mapping[str, Any] | None] | None = None
        self.taken_up: set[str] = set()  # contacts seeded from `known` (not vanished)
        self._handlers = {name: getattr(self, f"_on_{name}") for name in EVENTS}

    # -- entry points -------------------------------------------------------------------------
    def feed(self, event: Mapping[str, str], at: datetime) -> list[dict[str, Any]]:
        """One AMI event; the lifecycle events it causes, in order."""
        out: list[dict[str, Any]] = []
        self._track_channel(event)
        handler = self._handlers.get(event.get("Event", ""))
        if handler is not None:
            handler(event, at, out)
        if event.get("Event") == "Hangup":
            self._on_channel_gone(event.get("Uniqueid", ""), at, out)
        return out

    def feed_all(
        self, events: Iterable[tuple[Mapping[str, str], datetime]]
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for event, at in events:
            out.extend(self.feed(event, at))
        return out

    def mark_stale(self) -> None:
        """The link dropped: every channel known is unconfirmed until the next `resync`."""
        self.stale = set(self.channel_call)

    def resync(
        self,
        channels: list[Mapping[str, str]],
        queue_entries: list[Mapping[str, str]],
        at: datetime,
    ) -> list[dict[str, Any]]:
        """After a reconnect: `CoreShowChannel` and `QueueEntry` lists say what is live now.

        Calls that vanished meanwhile end; calls that started meanwhile are learned (queued, or
        popped to the agent they are with); calls known before keep their state, so no pop twice."""
        out: list[dict[str, Any]] = []
        live = {
            c.get("Uniqueid", ""): c
            for c in channels
            if c.get("Uniqueid") and c.get("Uniqueid") not in self.gone  # hung up since the list
        }
        channels = list(live.values())
        for uid in [u for u in self.stale if u not in live]:
            self._on_channel_gone(uid, at, out)
        self.stale = set()
        by_call: dict[str, list[Mapping[str, str]]] = {}
        for channel in channels:
            linkedid = channel.get("Linkedid") or channel.get("Uniqueid", "")
            if linkedid:
                by_call.setdefault(linkedid, []).append(channel)
        waiting = {e.get("Uniqueid") or e.get("Channel", ""): e for e in queue_entries}
        for linkedid, legs in by_call.items():
            met = self.calls.get(linkedid)
            new = met is None or met.unlisted  # met only in events since a restart: learn it
            call = self._call(linkedid)  # seeded from the hub's state, if it has the call
            seeded = new and call.unlisted
            call.unlisted = False
            for leg in legs:
                uid = leg.get("Uniqueid", "")
                call.channels.add(uid)
                self.channel_call[uid] = linkedid
                if new and uid == linkedid:
                    self._first_channel(call, leg)
            if new and not call.first_context:
                self._first_channel(call, legs[0])
            if new and not call.inbound:
                # contexts change as the dialplan runs: a call found in an inbound context or in a
                # queue counts as inbound (its first channel may have moved on)
                contexts = self.config.inbound_contexts
                call.inbound = any(
                    leg.get("Context") in contexts
                    or leg.get("Application") == "Queue"
                    or (leg.get("Uniqueid") in waiting or leg.get("Channel") in waiting)
                    for leg in legs
                )
            for leg in legs:
                entry = waiting.get(leg.get("Uniqueid", "")) or waiting.get(leg.get("Channel", ""))
                if entry is not None and seeded and not call.holder:  # the hub has it waiting
                    call.queue = call.last_queue = entry.get("Queue", "")
                    self._caller_id(call, entry)
                elif entry is not None and not call.queue:
                    wait = _int(entry.get("Wait"))
                    self._caller_id(call, entry)
                    joined = at - timedelta(seconds=wait) if wait else at
                    if call.last_at is not None and joined < call.last_at:
                        joined = call.last_at
                    self._join(call, entry.get("Queue", ""), joined, out)
            if new and not call.queue:
                # answered or ringing at an agent while we were away: pop it there (once)
                for leg in legs:
                    context = leg.get("Context", "")
                    resource = self._agent_leg_resource(leg)
                    if resource is None or context in self.config.inbound_contexts:
                        continue
                    if leg.get("Uniqueid") == linkedid:
                        continue
                    self._caller_id(call, legs[0])
                    self._leg(call, leg.get("Channel", ""), resource)
                    if resource == call.holder and not call.holder_leg:
                        call.holder_leg = _base(leg.get("Channel", ""))  # the hub's holder
                    if seeded and call.holder and resource in call.rung:
                        continue  # a party the hub has (consulted, or transferring away)
                    up = leg.get("ChannelStateDesc") == "Up"
                    if up or self.config.pop_on == "ring":
                        self._offer(call, resource, {"event": "routed"}, at, out, force=up)
                    if up:
                        self._answer(call, resource, leg.get("Channel", ""), at, out)
            if seeded:  # what the hub has is the baseline: only later changes are sent
                call.sent_fields = self._contact_fields(call)
        return out

    def end_vanished(self, contact_ids: Iterable[str], at: datetime) -> list[dict[str, Any]]:
        """Contacts this source started, restored by the hub from its journal, whose calls are
        no longer in Asterisk (called after `resync`): they ended while the hub was down."""
        out: list[dict[str, Any]] = []
        for contact_id in contact_ids:
            if contact_id in self.calls or contact_id in self.taken_up:
                continue
            call = Call(contact_id, started=True, ended=True)
            state = self.known(contact_id) if self.known is not None else None
            call.last_at = _moment(state.get("last_at") if state else None)
            self._emit(call, {"event": "ended"}, at, out)
        return out

    def _seed(self, call: Call) -> bool:
        """A call in progress this mapper does not know, as the hub knows it (a restart of the
        hub with this source inside: the journal restored the contact, this memory is new).
        Whoever the hub popped is not popped again, the one who answered stays the holder, and
        the next events are timed after the hub's last one. False: the hub does not know it."""
        state = self.known(call.linkedid) if self.known is not None else None
        if not state or state.get("ended_seen"):
            return False
        call.started = True
        call.inbound = True  # the hub has it: it was popped or queued as an inbound call
        call.last_at = _moment(state.get("last_at"))
        call.queued_at = _moment(state.get("segment_start"))
        call.rung = set(state.get("following") or ())  # popped in this round already
        if state.get("answered_at") and state.get("holder"):
            call.holder = str(state["holder"])
            call.rung.add(call.holder)
            # the others still following an answered call were consulted (or conferenced)
            call.consulted = call.rung - {call.holder}
        return True

    def _agent_leg_resource(self, leg: Mapping[str, str]) -> str | None:
        if leg.get("Application", "") not in ("AppQueue", "AppDial", "Queue", "Dial"):
            return None
        return self.config.resource(leg.get("Channel", ""))

    # -- channels and calls --------------------------------------------------------------------
    def _call(self, linkedid: str) -> Call:
        call = self.calls.get(linkedid)
        if call is None:
            call = self.calls[linkedid] = Call(linkedid)
            # after a restart the first events of a call in progress may come before the list
            # of calls: seeded as it is met, it goes on from what the hub has
            # (once: a call taken up and since ended is over, whatever event comes late)
            call.unlisted = (
                self.known is not None and linkedid not in self.taken_up and self._seed(call)
            )
            if call.unlisted:
                self.taken_up.add(linkedid)  # followed from here: ended by its own events
        return call

    def _leg(self, call: Call, channel: str, resource: str) -> None:
        """`channel` is an agent's leg of `call`: its other half and later events name the agent."""
        base = _base(channel)
        self.legs[base] = (call.linkedid, resource)
        call.legs.append(base)

    def _track_channel(self, event: Mapping[str, str]) -> None:
        uid = event.get("Uniqueid")
        linkedid = event.get("Linkedid")
        if not uid or not linkedid:
            return
        current = self.channel_call.get(uid)
        if current == linkedid or uid in self.gone:
            return
        if current is None and event.get("Event") == "Hangup":
            return  # a channel we never saw (e.g. before we connected, already resynced away)
        if current is not None:  # Asterisk moved the channel to another call (pickup, transfer)
            old = self.calls.get(current)
            if old is not None:
                old.channels.discard(uid)
        self.channel_call[uid] = linkedid
        self._call(linkedid).channels.add(uid)

    def _first_channel(self, call: Call, event: Mapping[str, str]) -> None:
        call.first_context = event.get("Context", "")
        contexts = self.config.inbound_contexts
        call.inbound = not contexts or call.first_context in contexts
        exten = _known(event.get("Exten"))
        if call.inbound and exten not in ("s", "") and not call.dnid:
            call.dnid = exten
        self._caller_id(call, event)

    def _caller_id(self, call: Call, event: Mapping[str, str]) -> None:
        number = _known(event.get("CallerIDNum"))
        if number and not call.caller:
            call.caller = number
        name = _known(event.get("CallerIDName"))
        if name and not call.caller_name:
            call.caller_name = name

    def _pops_allowed(self, call: Call) -> bool:
        return call.inbound or self.config.internal_calls

    def _on_channel_gone(self, uid: str, at: datetime, out: list[dict[str, Any]]) -> None:
        self.gone[uid] = None
        self.stale.discard(uid)
        if len(self.gone) > GONE_KEPT:
            # not `del d[next(iter(d))]`: on a dict that is O(deleted slots), quadratic here
            self.gone.popitem(last=False)
        linkedid = self.channel_call.pop(uid, None)
        if linkedid is None:
            return
        call = self.calls.get(linkedid)
        if call is None:
            return
        call.channels.discard(uid)
        if not call.channels:
            if call.started and not call.ended:
                call.ended = True
                self._emit(call, {"event": "ended"}, at, out)
            del self.calls[linkedid]
            for base in call.legs:
                if self.legs.get(base, ("",))[0] == linkedid:
                    del self.legs[base]
                self.direct.discard(base)

    # -- output ---------------------------------------------------------------------------------
    def _contact_fields(self, call: Call) -> dict[str, Any]:
        """What the call's events carry, cut to the hub's limits: one variable of 5,000
        characters made the hub refuse the `queued`, and every pop of the call came empty."""
        data = dict(call.data)
        if self.config.caller_name_key and call.caller_name:
            data.setdefault(self.config.caller_name_key, call.caller_name)
        if len(data) > MAX_DATA_ITEMS or any(
            len(k) > MAX_DATA_TEXT or len(v) > MAX_DATA_TEXT or not k for k, v in data.items()
        ):
            data = {
                k[:MAX_DATA_TEXT]: v[:MAX_DATA_TEXT]
                for k, v in list(data.items())[:MAX_DATA_ITEMS]
                if k
            }
        return {
            "source": call.caller[:MAX_TEXT],
            "destination": call.dnid[:MAX_TEXT],
            "queue_name": self.config.queue(call.queue or call.last_queue)[:MAX_TEXT],
            "contact_description": call.description[:MAX_TEXT],
            "contact_data": data,
        }

    def _emit(
        self, call: Call, event: dict[str, Any], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        if call.last_at is not None and at < call.last_at:
            at = call.last_at  # the hub refuses time going backwards; AMI order is the truth
        call.last_at = at
        kind = event["event"]
        body: dict[str, Any] = {"contact_id": call.linkedid, **event}
        if kind not in ("requeued", "ended"):
            changed = {}
            for key, value in self._contact_fields(call).items():
                if call.sent_fields.get(key) != value and (value or key in call.sent_fields):
                    changed[key] = value
            if not call.started:
                changed["media"] = "telephone"
            call.sent_fields.update({k: v for k, v in changed.items() if k != "media"})
            body.update(changed)
        elif kind == "requeued":
            fields = self._contact_fields(call)
            for key in ("queue_name", "contact_description", "contact_data"):
                body[key] = fields[key]
                call.sent_fields[key] = fields[key]
        body["at"] = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if kind in ("queued", "routed"):
            call.started = True
        out.append(body)

    # -- queue -----------------------------------------------------------------------------------
    def _join(self, call: Call, queue: str, at: datetime, out: list[dict[str, Any]]) -> None:
        previous = call.last_queue
        call.queue = call.last_queue = queue
        call.rung.clear()
        call.no_answer.clear()
        call.offers.clear()
        if not self._pops_allowed(call):
            return
        if not call.started:
            call.queued_at = at
            self._emit(call, {"event": "queued"}, at, out)
        elif call.holder or call.transfer_from:  # sent back to a queue by an agent: a new segment
            call.holder = ""
            self._emit(call, {"event": "requeued"}, at, out)
        else:  # still waiting: overflow or redirect to another queue; the wait goes on
            if call.abandoned_from:
                call.redirect_from = self.config.queue(call.abandoned_from or previous)
            self._emit(call, {"event": "queued"}, at, out)
        call.abandoned_from = ""

    def _on_QueueCallerJoin(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        call = self._call_of(event)
        if call is None:
            return
        self._caller_id(call, event)
        self._join(call, event.get("Queue", ""), at, out)

    def _on_QueueCallerLeave(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        call = self._call_of(event)
        if call is not None and call.queue == event.get("Queue"):
            call.queue = ""

    def _on_QueueCallerAbandon(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        call = self._call_of(event)
        if call is not None:
            call.abandoned_from = event.get("Queue", "")
            call.queue = ""

    def _on_AgentCalled(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        call = self._call_of(event)
        if call is None:
            return
        resource = self.config.resource(event.get("Interface", "")) or self.config.resource(
            event.get("DestChannel", "")
        )
        if resource is None:
            return
        self._leg(call, event.get("DestChannel", ""), resource)
        if resource in call.no_answer:
            call.no_answer.discard(resource)
            call.rung.discard(resource)
            self._offer(call, resource, {"event": "recalled"}, at, out)
        else:
            self._offer(call, resource, self._arrival(call), at, out)

    def _arrival(self, call: Call) -> dict[str, Any]:
        """How the call reaches the next agent: routed, or transferred / redirected to them."""
        if call.transfer_from:
            return {"event": "transferred", "from": call.transfer_from}
        if call.redirect_from:
            return {"event": "redirected", "redirect": call.redirect_from}
        return {"event": "routed"}

    def _offer(
        self,
        call: Call,
        resource: str,
        event: dict[str, Any],
        at: datetime,
        out: list[dict[str, Any]],
        force: bool = False,
    ) -> None:
        """An agent is rung: pop now (pop_on ring) or keep the offer until they answer."""
        if not self._pops_allowed(call) or resource in call.rung:
            return  # one pop per agent per round, however many devices ring
        if self.config.pop_on == "ring" or force:
            call.rung.add(resource)
            self._emit(call, {**event, "resource": resource}, at, out)
        else:
            call.offers.setdefault(resource, event)

    def _answer(
        self, call: Call, resource: str, leg: str, at: datetime, out: list[dict[str, Any]]
    ) -> None:
        if not self._pops_allowed(call) or call.holder == resource:
            return
        offer = call.offers.pop(resource, None)
        if resource not in call.rung:
            if offer is None:
                offer = self._arrival(call)
            call.rung.add(resource)
            self._emit(call, {**offer, "resource": resource}, at, out)
        call.holder, call.holder_leg = resource, _base(leg)
        call.on_hold = False
        call.transfer_from = call.redirect_from = ""
        call.offers.clear()
        call.consulted.clear()
        self._emit(call, {"event": "answered", "resource": resource}, at, out)

    def _on_AgentConnect(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        call = self._call_of(event)
        if call is None:
            return
        call.queue = ""  # connected: out of the queue (QueueCallerLeave says so too)
        leg = event.get("DestChannel", "")
        known = self.legs.get(_base(leg))
        resource = known[1] if known else self.config.resource(event.get("Interface", ""))
        if resource is None:
            return
        if (
            self.config.pop_on == "answer"
            and resource not in call.rung
            and call.queued_at is not None
        ):
            # the pop's wait is Asterisk's HoldTime: time the routing from the join
            hold = _int(event.get("HoldTime"))
            if call.transfer_from == "" and call.redirect_from == "":
                start = call.queued_at
                at = max(call.last_at or start, start + timedelta(seconds=hold))
        self._answer(call, resource, leg, at, out)

    def _on_AgentRingNoAnswer(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        call = self._call_of(event)
        if call is None:
            return
        resource = self.config.resource(event.get("Interface", ""))
        if resource is not None and resource in call.rung:
            call.no_answer.add(resource)

    # -- dials outside queues: direct calls, consultations ---------------------------------------
    def _on_DialBegin(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        dest = event.get("DestChannel", "")
        if _base(dest) in self.legs:
            return  # a queue member's leg, already handled by AgentCalled
        linkedid = event.get("Linkedid") or event.get("DestLinkedid", "")
        call = self.calls.get(linkedid)
        if call is None or call.ended:
            return
        caller_leg = _base(event.get("Channel", ""))
        if caller_leg in self.legs:
            # an agent's leg dialling on: its devices (one extension, several phones), or a
            # consultation from the agent who has the call
            if call.holder and self.legs[caller_leg][1] == call.holder:
                self._consult(call, dest, at, out)
            return
        resource = self.config.resource(dest)
        if resource is None:
            return
        if call.holder:  # answered: a new leg from outside a queue is a consultation (Atxfer)
            if not event.get("Channel") or caller_leg == call.holder_leg:
                self._consult(call, dest, at, out)
            return
        if not event.get("Channel"):
            return  # an originate's own leg, not an agent being rung
        if call.queue:
            return  # in a queue, only AgentCalled rings agents
        if not call.started and not self._pops_allowed(call):
            return
        self._leg(call, dest, resource)
        self.direct.add(_base(dest))
        self._caller_id(call, event)
        self._offer(call, resource, self._arrival(call), at, out)

    def _consult(self, call: Call, dest: str, at: datetime, out: list[dict[str, Any]]) -> None:
        resource = self.config.resource(dest)
        if resource is None or resource == call.holder or not self._pops_allowed(call):
            return
        self._leg(call, dest, resource)
        if resource not in call.consulted:
            call.consulted.add(resource)
            self._emit(
                call, {"event": "consulted", "from": call.holder, "resource": resource}, at, out
            )

    def _on_DialEnd(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        """A direct call is answered when its dial is (queue calls: AgentConnect)."""
        if event.get("DialStatus") != "ANSWER":
            return
        dest = event.get("DestChannel", "")
        base = _base(dest)
        if base not in self.direct:
            return
        known = self.legs.get(base)
        call = self.calls.get(known[0]) if known else None
        if call is not None and known is not None:
            self._answer(call, known[1], dest, at, out)

    def _on_Hold(self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]) -> None:
        """The agent who has the call puts the caller on hold: a new leg now is a consultation."""
        call = self._call_of(event)
        if call is not None and call.holder and _base(event.get("Channel", "")) == call.holder_leg:
            call.on_hold = True

    def _on_Unhold(self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]) -> None:
        call = self._call_of(event)
        if call is not None and _base(event.get("Channel", "")) == call.holder_leg:
            call.on_hold = False

    # -- transfers and pickup --------------------------------------------------------------------
    def _on_BlindTransfer(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        call = self.calls.get(event.get("TransfereeLinkedid", ""))
        if call is None or event.get("Result", "Success") != "Success":
            return
        by = self.legs.get(_base(event.get("TransfererChannel", "")))
        call.transfer_from = (
            by[1] if by else (self.config.resource(event.get("TransfererChannel", "")) or "")
        )
        call.holder = ""
        call.rung.clear()
        call.no_answer.clear()

    def _on_AttendedTransfer(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        linkedid = event.get("TransfereeLinkedid") or event.get("OrigTransfererLinkedid", "")
        call = self.calls.get(linkedid)
        if (
            call is None
            or event.get("Result", "Success") != "Success"
            or not self._pops_allowed(call)
        ):
            return
        target = event.get("TransferTargetChannel", "")
        known = self.legs.get(_base(target))
        resource = known[1] if known else self.config.resource(target)
        if resource is None:
            return
        by = self.legs.get(_base(event.get("OrigTransfererChannel", "")))
        transferer = by[1] if by else call.holder
        self._leg(call, target, resource)
        if resource in call.consulted:  # popped when consulted: now it has the call
            call.holder, call.holder_leg = resource, _base(target)
            call.consulted.discard(resource)
            self._emit(call, {"event": "answered", "resource": resource}, at, out)
        else:
            call.rung.discard(resource)
            call.transfer_from = transferer
            self._answer(call, resource, target, at, out)

    def _on_Pickup(self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]) -> None:
        target = self.legs.get(_base(event.get("TargetChannel", "")))
        linkedid = target[0] if target else event.get("TargetLinkedid", "")
        call = self.calls.get(linkedid)
        picker = self.config.resource(event.get("Channel", ""))
        if call is None or picker is None or not self._pops_allowed(call):
            return
        self._leg(call, event.get("Channel", ""), picker)
        call.offers.pop(picker, None)
        if picker not in call.rung:
            call.rung.add(picker)
            self._emit(call, {"event": "picked_up", "resource": picker}, at, out)

    # -- data --------------------------------------------------------------------------------------
    def _on_Newchannel(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        call = self._call_of(event)
        if call is None:
            return
        if event.get("Uniqueid") == call.linkedid:
            self._first_channel(call, event)
        elif call.on_hold and _base(event.get("Channel", "")) not in self.legs:
            self._consult(
                call, event.get("Channel", ""), at, out
            )  # Atxfer: no DialBegin of its own

    def _on_Hangup(self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]) -> None:
        return  # handled after the event (the call ends with its last channel)

    def _on_VarSet(self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]) -> None:
        name = event.get("Variable", "").lstrip("_")
        prefix = self.config.variable_prefix
        if not prefix or not name.startswith(prefix):
            return
        call = self._call_of(event)
        if call is not None:
            self._attach(call, name[len(prefix) :], event.get("Value", ""))

    def _on_UserEvent(
        self, event: Mapping[str, str], at: datetime, out: list[dict[str, Any]]
    ) -> None:
        if event.get("UserEvent") != self.config.user_event:
            return
        call = self._call_of(event)
        if call is None:
            return
        for key, value in event.items():
            if key not in _CHANNEL_HEADERS and "#" not in key:
                self._attach(call, key, value)

    def _attach(self, call: Call, key: str, value: str) -> None:
        upper = key.upper()
        if upper == "DESCRIPTION":
            call.description = value
        elif upper == "DNID":
            call.dnid = value
        elif upper == "CALLERID":
            call.caller = value
        else:
            key = self.config.data_keys.get(key, key)
            if value or key in call.data:
                call.data[key] = value

    def _call_of(self, event: Mapping[str, str]) -> Call | None:
        linkedid = event.get("Linkedid")
        if not linkedid:
            return None
        call = self.calls.get(linkedid)
        if call is None and not event.get("Uniqueid"):
            return None
        return call if call is not None else self._call(linkedid)


def _moment(value: Any) -> datetime | None:
    """A time of the hub's contact state (ISO 8601), or None."""
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _int(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0
