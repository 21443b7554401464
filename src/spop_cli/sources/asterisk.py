"""The `asterisk` source: an AMI link to Asterisk or FreePBX whose calls become contact lifecycle
events. The link (`ami`) and the mapping (`asterisk_map`) are separate; this module wires them,
reads `[sources.NAME]`, reconnects, and sends the events to the hub in order.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from .. import hookimpl
from . import HubSink, Source, SourceContext, SourceError
from .ami import DEFAULT_PORT, AmiAuthError, AmiConnection, AmiError
from .asterisk_map import (
    DEFAULT_AGENT_PATTERNS,
    DEFAULT_INBOUND_CONTEXTS,
    EVENTS,
    AsteriskMapper,
    MapConfig,
)

SECRET_ENV = "SPOP_ASTERISK_SECRET"
#: the read classes of manager.conf the mapping needs, and which events each brings
READ_CLASSES = {
    "call": "Newchannel, Hangup, Dial*, Hold, transfers, Pickup",
    "agent": "QueueCallerJoin/Leave/Abandon, AgentCalled/Connect/RingNoAnswer",
    "user": "UserEvent (data the dialplan attaches)",
    "dialplan": "VarSet (SPOP_ variables), Newexten",
}
EVENT_MASK = ",".join(READ_CLASSES)
MAX_BATCH = 1000  # the hub's limit per array
MAX_BACKLOG = 100_000  # events kept while the hub is unreachable; older ones are dropped, logged

OPTIONS: dict[str, type | tuple[type, ...]] = {
    "host": str,
    "port": int,
    "username": str,
    "secret": str,
    "pop_on": str,
    "agent_patterns": list,
    "resource_names": dict,
    "queue_names": dict,
    "inbound_contexts": list,
    "internal_calls": bool,
    "variable_prefix": str,
    "user_event": str,
    "caller_name_key": str,
    "data_keys": dict,
    "filter": bool,
    "connect_timeout": (int, float),
    "reconnect_max": (int, float),
}

KIND_NAMES: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    list: "a list of strings",
    dict: "a table of strings",
    (int, float): "a number",
}


def _check_table(options: Mapping[str, Any]) -> None:
    for key, value in options.items():
        if key not in OPTIONS:
            raise SourceError(f"unknown key (expected one of {', '.join(OPTIONS)})", key)
        kind = OPTIONS[key]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise SourceError(f"must be {KIND_NAMES[kind]}", key)
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise SourceError("must be a list of strings", key)
        if isinstance(value, dict) and not all(isinstance(v, str) for v in value.values()):
            raise SourceError("must be a table of strings", key)
    port = options.get("port", DEFAULT_PORT)
    if not 0 < port < 65536:
        raise SourceError("must be a port number", "port")
    if options.get("pop_on", "ring") not in ("ring", "answer"):
        raise SourceError('must be "ring" or "answer"', "pop_on")
    for pattern in options.get("agent_patterns", ()):
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise SourceError(
                f"bad regular expression {pattern!r}: {exc}", "agent_patterns"
            ) from None
        if compiled.groups < 1:  # group 1 is the agent's resource: without it nobody is popped
            raise SourceError(
                f"{pattern!r} has no group: group 1 must capture the agent's resource, "
                'e.g. "^PJSIP/(\\w+)-"',
                "agent_patterns",
            )
    for key in ("connect_timeout", "reconnect_max"):
        if options.get(key, 1) <= 0:
            raise SourceError("must be more than 0", key)


class AsteriskSource(Source):
    """Reads AMI, maps calls to lifecycle events, sends them to the hub; reconnects by itself."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        _check_table(options)
        self.host = options.get("host", "127.0.0.1")
        self.port = int(options.get("port", DEFAULT_PORT))
        self.username = options.get("username", "spop")
        self._secret = options.get("secret")
        self.filter = options.get("filter", True)
        self.connect_timeout = float(options.get("connect_timeout", 10.0))
        self.reconnect_max = float(options.get("reconnect_max", 30.0))
        self.map_config = MapConfig(
            pop_on=options.get("pop_on", "ring"),
            agent_patterns=tuple(options.get("agent_patterns", DEFAULT_AGENT_PATTERNS)),
            resource_names=dict(options.get("resource_names", {})),
            queue_names=dict(options.get("queue_names", {})),
            inbound_contexts=tuple(options.get("inbound_contexts", DEFAULT_INBOUND_CONTEXTS)),
            internal_calls=options.get("internal_calls", False),
            variable_prefix=options.get("variable_prefix", "SPOP_"),
            user_event=options.get("user_event", "SpopData"),
            caller_name_key=options.get("caller_name_key", "caller_name"),
            data_keys=dict(options.get("data_keys", {})),
        )
        self.mapper = AsteriskMapper(self.map_config)
        self.watch = ClassWatch(self.username)
        self.connected = asyncio.Event()  # set while logged in (the tests wait on it)
        self.sessions = 0
        self.restored = False  # the hub's open contacts of this source read once, at start
        self.hub_open: dict[str, dict[str, Any]] | None = None  # read, for the first list
        self.clock = EventClock()

    @property
    def secret(self) -> str:
        secret = self._secret if self._secret is not None else os.environ.get(SECRET_ENV)
        if not secret:
            raise SourceError(f"no AMI secret: set secret in the table or {SECRET_ENV}", "secret")
        return secret

    def __repr__(self) -> str:  # never the secret
        return f"AsteriskSource({self.username}@{self.host}:{self.port})"

    # -- the link --------------------------------------------------------------------------------
    async def _open(
        self, on_event: Callable[[dict[str, str]], None], ctx: SourceContext
    ) -> AmiConnection:
        ami = AmiConnection(on_event, ctx.log)
        try:
            await ami.connect(self.host, self.port, self.connect_timeout)
            await ami.login(self.username, self.secret, EVENT_MASK, self.connect_timeout)
        except BaseException:
            ami.close()
            raise
        return ami

    async def _ask_filter(self, ami: AmiConnection, ctx: SourceContext) -> bool:
        """Ask Asterisk to send only the events the mapping reads; if it refuses (a permission the
        user lacks), log the manager.conf `eventfilter` lines that do the same."""
        prefix = re.escape(self.map_config.variable_prefix)
        filters = [
            f"Event: ({'|'.join(e for e in EVENTS if e != 'VarSet')})",  # VarSet: by its name below
            f"Variable: _*{prefix}",
            "Application: (Queue|UserEvent)",
        ]
        for rule in filters:
            answer, _ = await ami.action(
                "Filter", {"Operation": "Add", "Filter": rule}, self.connect_timeout
            )
            if answer.get("Response") != "Success":
                ctx.log.info(
                    "Asterisk did not take the event filter (%s); every event of the classes %s is "
                    "read and the unneeded ones skipped. To filter in Asterisk, add to [%s] in "
                    "manager.conf: %s",
                    answer.get("Message", "refused"),
                    EVENT_MASK,
                    self.username,
                    "; ".join(f"eventfilter={r}" for r in filters),
                )
                return False
        return True

    async def _resync(self, ami: AmiConnection, ctx: SourceContext) -> list[dict[str, Any]] | None:
        """The calls in progress now (CoreShowChannels, QueueStatus), for the mapper. A list
        that does not come within connect_timeout is given up, not the link: reconnecting would
        lose the events of every gap, and ask the same slow list again."""
        try:
            return await self._lists(ami, ctx)
        except TimeoutError:
            ctx.log.warning(
                "Asterisk did not list its calls (CoreShowChannels, QueueStatus) within "
                "connect_timeout (%g s): calls in progress are not learned this time (raise "
                "connect_timeout for a PBX this busy); events are read on",
                self.connect_timeout,
            )
            return None
        finally:
            if self.watch.before is None:  # not listed: every channel's events count
                self.watch.listed(set())

    async def _lists(self, ami: AmiConnection, ctx: SourceContext) -> list[dict[str, Any]] | None:
        answer, channels = await ami.action("CoreShowChannels", {}, self.connect_timeout)
        if answer.get("Response") != "Success":
            ctx.log.error(
                "AMI user %r may not list channels (%s): calls in progress at a reconnect are not "
                "learned; add reporting to write= in its [%s] section of manager.conf",
                self.username,
                answer.get("Message", "refused"),
                self.username,
            )
            return None
        answer, status = await ami.action("QueueStatus", {}, self.connect_timeout)
        entries = [e for e in status if e.get("Event") == "QueueEntry"]
        channels = [c for c in channels if c.get("Event") == "CoreShowChannel"]
        ctx.log.info(
            "Asterisk: %d channels, %d callers waiting in queues", len(channels), len(entries)
        )
        # the first list since this source (or the hub with it) started: the calls the hub has
        # from this source are known, not new, and those Asterisk no longer lists ended meanwhile
        opened = self.hub_open
        self.watch.listed({c.get("Uniqueid", "") for c in channels})
        now = datetime.now(UTC)  # the events' times are on this clock too (EventClock)
        learned = self.mapper.resync(channels, entries, now)
        if opened is not None:
            learned += self.mapper.end_vanished(opened, now)
            self.hub_open = None
            self.mapper.known = None  # a snapshot: later lists go by what this source saw
            self.mapper.taken_up.clear()
        return learned

    async def _read_hub_open(self, ctx: SourceContext) -> None:
        """Once, before the first login: the hub's open contacts that this source started (a
        restart of `spop serve` with it inside, or of this `spop source`). A hub that cannot
        say (unreachable, older) leaves the calls in progress to be learned as after a
        reconnect: logged, never fatal."""
        ask = getattr(ctx.sink, "open_contacts", None)
        if self.restored or ask is None:
            return
        try:
            contacts = await ask(ctx.name)
        except Exception as exc:
            ctx.log.warning(
                "the hub's open calls of source %r are unknown (%s): calls already with an agent "
                "are popped there again",
                ctx.name,
                getattr(exc, "message", None) or exc,
            )
            return
        self.hub_open = {c["contact_id"]: c for c in contacts if c.get("contact_id")}
        self.mapper.known = self.hub_open.get  # the calls met before the list, too
        self.restored = True
        ctx.log.info("the hub has %d open calls of source %r", len(self.hub_open), ctx.name)

    async def run(self, ctx: SourceContext) -> None:
        outbox = Outbox(ctx)
        sender = asyncio.get_running_loop().create_task(outbox.run())
        delay = 0.5
        try:
            while not ctx.stop.is_set():
                try:
                    await self._session(ctx, outbox)
                    delay = 0.5  # it was up: the next try is quick
                except (AmiAuthError, SourceError) as exc:  # a wrong or missing secret
                    ctx.log.error("%s", exc)
                    delay = self.reconnect_max  # not fixed by hammering; retried for a fixed config
                except (TimeoutError, OSError, AmiError) as exc:
                    ctx.log.warning(
                        "Asterisk AMI %s:%s unreachable (%s); retrying in %.1f s",
                        self.host,
                        self.port,
                        self._why(exc),
                        delay,
                    )
                try:
                    await asyncio.wait_for(ctx.stop.wait(), delay * (0.5 + random.random() / 2))
                except TimeoutError:
                    pass
                delay = min(delay * 2, self.reconnect_max)
        finally:
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, Exception):
                pass

    async def _session(self, ctx: SourceContext, outbox: Outbox) -> None:
        mapper = self.mapper
        mapper.mark_stale()
        self.watch.link_dropped()
        self.clock.reset()

        def on_event(event: dict[str, str]) -> None:
            at = self.clock.at(event)
            problem = self.watch.see(event)
            if problem:
                ctx.log.error("%s", problem)
            events = mapper.feed(event, at)
            if events:
                outbox.put(events)

        await self._read_hub_open(ctx)
        ami = await self._open(on_event, ctx)
        try:
            self.sessions += 1
            ctx.log.info(
                "Asterisk AMI %s:%s: logged in as %s (%s)",
                self.host,
                self.port,
                self.username,
                ami.banner,
            )
            if self.filter:
                await self._ask_filter(ami, ctx)
            learned = await self._resync(ami, ctx)
            if learned:
                outbox.put(learned)
            self.connected.set()
            stop = asyncio.ensure_future(ctx.stop.wait())
            try:
                await asyncio.wait([stop, ami.closed], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[list-item]
            finally:
                stop.cancel()
            if not ctx.stop.is_set():
                ctx.log.warning("Asterisk AMI %s:%s: connection lost", self.host, self.port)
        finally:
            self.connected.clear()
            ami.close()

    def _why(self, exc: BaseException) -> str:
        """What failed, never empty: a TimeoutError has no text of its own."""
        if str(exc):
            return str(exc)
        if isinstance(exc, TimeoutError):
            return f"no banner or answer within connect_timeout ({self.connect_timeout:g} s)"
        return type(exc).__name__

    async def check(self, ctx: SourceContext, out: Callable[[str], None]) -> bool:
        """Log in, list what is in progress, watch events for 2 s, say what was seen."""
        _ = self.secret  # none: the table's problem (SourceError, exit 12), before the link's
        seen: dict[str, int] = {}

        def on_event(event: dict[str, str]) -> None:
            for klass in event.get("Privilege", "").split(","):
                if klass and klass != "all":
                    seen[klass] = seen.get(klass, 0) + 1

        try:
            ami = await self._open(on_event, ctx)
        except AmiAuthError as exc:
            out(f"{ctx.name}: {exc}")
            return False
        except (TimeoutError, OSError, AmiError) as exc:
            out(
                f"{ctx.name}: cannot reach Asterisk AMI at {self.host}:{self.port}: {self._why(exc)}"
            )
            return False
        try:
            out(
                f"{ctx.name}: {ami.banner} at {self.host}:{self.port}, logged in as {self.username}"
            )
            answer, channels = await ami.action("CoreShowChannels", {}, self.connect_timeout)
            if answer.get("Response") == "Success":
                listed = [c for c in channels if c.get("Event") == "CoreShowChannel"]
                calls = {c.get("Linkedid") for c in listed}
                out(f"{ctx.name}: {len(listed)} channels in {len(calls - {None})} calls")
            else:
                out(
                    f"{ctx.name}: cannot list channels ({answer.get('Message')}): add reporting to write= in [{self.username}]"
                )
            answer, status = await ami.action("QueueStatus", {}, self.connect_timeout)
            queues = [e.get("Queue", "") for e in status if e.get("Event") == "QueueParams"]
            waiting = sum(1 for e in status if e.get("Event") == "QueueEntry")
            out(f"{ctx.name}: queues: {', '.join(queues) or 'none'}; {waiting} callers waiting")
            await asyncio.sleep(2.0)
            classes = ", ".join(f"{k} {n}" for k, n in sorted(seen.items())) or "none yet"
            out(f"{ctx.name}: events in 2 s by class: {classes}")
            out(f"{ctx.name}: needs read = {EVENT_MASK} in [{self.username}] of manager.conf")
            return True
        finally:
            ami.close()


class Outbox:
    """Events waiting for the hub, sent in order; kept while the hub is away.

    Inside the hub (HubSink) a batch is applied the moment it is sent and only its journal commit
    is awaited, so up to IN_FLIGHT batches are sent without waiting for the commits before them
    (a pop is delivered on apply: waiting would add a commit to each pop's latency). The hub
    applies them in the order they were sent: a batch about a contact still in an earlier batch's
    commit lines up behind it (`Hub._line_up`), and a refused event does not stop its batch (the
    rest, sent again, would come after the later batches). Over the network (RemoteSink) batches
    go one at a time."""

    IN_FLIGHT = 32

    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx
        self.events: list[dict[str, Any]] = []
        self.wake = asyncio.Event()
        self.sent = 0
        self.pipelined = isinstance(ctx.sink, HubSink)
        self.run_id = f"ami-{secrets.token_hex(4)}"  # this process's events: unique across runs
        self.numbered = 0
        self.limit = self.IN_FLIGHT if self.pipelined else 1
        self.in_flight: deque[tuple[asyncio.Task[Any], list[dict[str, Any]]]] = deque()

    def put(self, events: list[dict[str, Any]]) -> None:
        if not self.pipelined:  # over the network a batch whose answer was lost is sent again:
            for event in events:  # ids make the hub apply it once (inside, nothing is lost)
                self.numbered += 1
                event["id"] = f"{self.run_id}-{self.numbered}"
        self.events.extend(events)
        if len(self.events) > MAX_BACKLOG:
            dropped = len(self.events) - MAX_BACKLOG
            del self.events[:dropped]
            self.ctx.log.error("hub unreachable: %d oldest contact events dropped", dropped)
        self.wake.set()

    def _send(self, batch: list[dict[str, Any]]) -> Any:
        if self.pipelined:
            return self.ctx.sink.send(batch, skip_refused=True, origin=self.ctx.name)  # type: ignore[call-arg]
        return self.ctx.sink.send(batch, origin=self.ctx.name)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.5
        try:
            while True:
                if not self.events and not self.in_flight:
                    await self.wake.wait()
                    self.wake.clear()
                    continue
                if self.events and len(self.in_flight) < self.limit:
                    batch = self.events[:MAX_BATCH]
                    del self.events[: len(batch)]
                    # tasks start in the order they are made: the hub lines the batches up in order
                    self.in_flight.append((loop.create_task(self._send(batch)), batch))
                    await asyncio.sleep(0)
                    if not self.in_flight[0][0].done() and len(self.in_flight) < self.limit:
                        continue
                task, batch = self.in_flight[0]
                if not task.done():
                    waiter = loop.create_task(self.wake.wait())
                    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    self.wake.clear()
                    if not task.done():
                        continue
                self.in_flight.popleft()
                retry = self._outcome(task, batch)
                if retry is None:
                    delay = 0.5
                    continue
                # the hub was not reached: every batch not taken goes back, in order, and waits
                # (a later one about the same contacts was refused with it: the hub keeps a
                # contact's events in order)
                for later, later_batch in self.in_flight:
                    try:
                        await later
                    except Exception:
                        pass
                    again = self._outcome(later, later_batch)
                    if again is not None:
                        retry.extend(again)
                self.in_flight.clear()
                self.events[:0] = retry
                self.ctx.log.warning(
                    "hub did not take %d events (%s); retrying in %.1f s",
                    len(retry),
                    task.exception(),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        finally:
            for task, _ in self.in_flight:
                task.cancel()

    def _outcome(
        self, task: asyncio.Task[Any], batch: list[dict[str, Any]]
    ) -> list[dict[str, Any]] | None:
        """None when the batch is done with (taken, or refused and logged); else what to resend."""
        exc = task.exception()
        if exc is None:
            refused = task.result().get("refused", ())
            for refusal in refused:
                self._refused(batch, refusal.index, refusal)
            self.sent += task.result().get("applied", 0)
            return None
        index = _refused_index(exc)
        if index is None:
            return list(batch)
        self._refused(batch, index, exc)
        self.sent += index
        self.events[:0] = batch[index + 1 :]  # the events after it were not applied
        return None

    def _refused(self, batch: list[dict[str, Any]], index: int | None, exc: Exception) -> None:
        bad = batch[index] if index is not None and 0 <= index < len(batch) else {}
        self.ctx.log.error(
            "hub refused %s of contact %s: %s; skipping it",
            bad.get("event"),
            bad.get("contact_id"),
            exc,
        )


def _refused_index(exc: Exception) -> int | None:
    """The index of the event the hub refused, or None when the hub did not take the batch
    (unreachable, or its journal could not commit: 503, nothing applied, to be sent again)."""
    index = getattr(exc, "index", None)
    detail = getattr(exc, "detail", None)
    error = detail.get("error") if isinstance(detail, dict) else getattr(exc, "error", None)
    if error == "journal_unavailable":
        return None
    if index is None and isinstance(detail, dict):
        index = detail.get("index", 0 if detail.get("error") else None)
    if index is None and getattr(exc, "error", None):
        index = 0
    return index


class EventClock:
    """Each AMI event's time, on this host's clock. Asterisk's `Timestamp` (timestampevents=yes)
    keeps the events' spacing exact however late they are read; its clock may differ from ours,
    so stamps are moved by the smallest lag seen in this session (stamp minus arrival, at most
    Asterisk's lead): the calls learned from a list (timed here) and their events then agree.
    Without a stamp (the default), the time an event is read."""

    LIMIT = 86_400.0  # a stamp further than a day from our clock is no clock: ignored

    def __init__(self) -> None:
        self.ahead: float | None = None  # Asterisk's clock minus ours, as far as seen

    def reset(self) -> None:
        """A new session: Asterisk may have been restarted, its clock set."""
        self.ahead = None

    def at(self, event: Mapping[str, str], now: float | None = None) -> datetime:
        now = time.time() if now is None else now
        stamp = event.get("Timestamp")
        if stamp:
            try:
                value = float(stamp)
            except ValueError:
                value = math.nan
            if abs(value - now) <= self.LIMIT:  # false for nan and inf
                ahead = value - now
                if self.ahead is None or ahead > self.ahead:
                    self.ahead = ahead
                return datetime.fromtimestamp(value - self.ahead, UTC)
        return datetime.fromtimestamp(now, UTC)


class ClassWatch:
    """Finds read classes the AMI user lacks, from the stream itself: Queue() ran but no queue
    event came (agent), UserEvent() ran but no UserEvent came (user), callers joined queues with
    no dialplan event (dialplan), events about channels but none of the channels' own (call).
    Each is said once, with the manager.conf fix."""

    SAMPLE = 20  # channel events of other classes before a silent 'call' class counts as missing

    def __init__(self, username: str) -> None:
        self.username = username
        self.reported: set[str] = set()
        self.classes: set[str] = set()
        self.others = 0
        self.queue_app: dict[str, bool] = {}  # Uniqueid that ran Queue() -> a queue event came
        self.user_app: dict[str, bool] = {}
        # the channels Asterisk listed at this session's start (None: not listed yet): their
        # Newchannel came before we read, so their other events prove nothing of 'call'
        self.before: set[str] | None = None

    def link_dropped(self) -> None:
        """A new session: what the calls in progress ran before it proves nothing now (their
        queue or user events may have come while the link was down)."""
        self.queue_app.clear()
        self.user_app.clear()
        self.before = None

    def listed(self, uids: set[str]) -> None:
        """The channels in progress at this session's start (CoreShowChannels; an empty set
        when Asterisk did not list them): only the others' events count for 'call'."""
        self.before = uids

    def _missing(self, klass: str, why: str) -> str | None:
        if klass in self.reported:
            return None
        self.reported.add(klass)
        return (
            f"AMI user {self.username!r} gets no '{klass}' events ({why}): pops will be missing. "
            f"Fix: read = {EVENT_MASK} in the [{self.username}] section of Asterisk's manager.conf, "
            f"then `asterisk -rx 'manager reload'`"
        )

    def see(self, event: Mapping[str, str]) -> str | None:
        classes = event.get("Privilege", "").split(",")
        self.classes.update(classes)
        name = event.get("Event", "")
        uid = event.get("Uniqueid", "")
        if (
            uid
            and "call" not in self.classes
            and self.before is not None
            and uid not in self.before
        ):
            self.others += 1
            if self.others >= self.SAMPLE:
                return self._missing("call", "channel events came, but never Newchannel or Hangup")
        if name == "Newexten":
            app = event.get("Application", "")
            if app == "Queue":
                self.queue_app.setdefault(uid, False)
            elif app == "UserEvent":
                self.user_app.setdefault(uid, False)
        elif name.startswith("QueueCaller"):
            if uid in self.queue_app:
                self.queue_app[uid] = True
            if name == "QueueCallerJoin" and "dialplan" not in self.classes:
                return self._missing("dialplan", "callers join queues, but no dialplan event came")
        elif name == "UserEvent":
            self.user_app[uid] = True
        elif name == "Hangup":
            queue = self.queue_app.pop(uid, None)
            user = self.user_app.pop(uid, None)
            if queue is False:
                return self._missing("agent", "Queue() ran, but no queue event came")
            if user is False:
                return self._missing("user", "UserEvent() ran, but no UserEvent came")
        return None


@hookimpl
def register_sources(register: Callable[..., None]) -> None:
    register(
        "asterisk", AsteriskSource, "Asterisk / FreePBX calls over the Manager Interface (AMI)"
    )
