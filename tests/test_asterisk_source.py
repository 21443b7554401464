"""The Asterisk source end to end: a fake AMI server replays a real Asterisk 22's recorded stream
(shared/fixtures/asterisk) to the real source, which feeds a real hub, which pops real listeners.
Paced and at once in random pieces, through a restart of Asterisk, with a wrong secret, missing
read classes and malformed lines."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest

from fake_ami import ALL_CLASSES, FakeAsterisk, busy_pbx, transcript_blocks
from hubproc import Counting, HubProcess, address_of, inprocess_hub, run, until
from natsproc import NatsCluster
from spop_cli.sources import HubSink, RemoteSink, SourceContext
from spop_cli.sources.asterisk import AsteriskSource, ClassWatch, EventClock, Outbox

BLOCKS = transcript_blocks()
AGENTS = ("100", "101", "200", "104", "3")
# the six scenarios' calls (Linkedid) in the recording
A, B, C, D, E, F = (
    "1796221474.0",
    "1796221480.6",
    "1796221487.14",
    "1796221497.22",
    "1796221506.28",
    "1796221513.34",
)


class Recording:
    """A HubSink that also keeps every event sent and the hub's answer (the pops it made)."""

    def __init__(self, hub: Any) -> None:
        self.inner = HubSink(hub)
        self.events: list[dict[str, Any]] = []

    async def send(self, events: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        answer = await self.inner.send(events, **options)
        self.events.extend(events)
        return answer


class Restored(HubSink):
    """The sink of a source inside `spop serve` (HubSink), keeping every event sent."""

    def __init__(self, hub: Any) -> None:
        super().__init__(hub)
        self.events: list[dict[str, Any]] = []

    async def send(self, events: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        answer = await super().send(events, **options)
        self.events.extend(events)
        return answer


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def source_for(ami: FakeAsterisk, **options: Any) -> AsteriskSource:
    table = {
        "port": ami.port,
        "secret": "spop-secret",
        "resource_names": {"pick": "104"},
        **options,
    }
    return AsteriskSource(table)


def context(sink: Any, name: str = "pbx") -> tuple[SourceContext, Captured]:
    log = logging.getLogger(f"spop.test.asterisk.{id(sink)}")
    log.setLevel(logging.DEBUG)
    captured = Captured()
    log.addHandler(captured)
    return SourceContext(sink, log, name), captured


def seen(listeners: dict[str, Counting]) -> dict[str, list[tuple[str, str, str]]]:
    return {r: [(p[0], p[1], p[2]) for p in c.pops] for r, c in listeners.items()}  # type: ignore[attr-defined]


class Agent(Counting):
    """A listener that keeps each pop's (contact, from, redirect) and its full event."""

    def __init__(self) -> None:
        super().__init__()
        self.pops: list[tuple[str, str, str]] = []
        self.events: list[Any] = []
        self.listener.on_screen_pop(self._keep)

    def _keep(self, event: Any) -> None:
        self.pops.append((event.contact_id, event.from_, event.redirect))
        self.events.append(event)


class FollowingAgent(Agent):
    """An agent whose listener also follows its contacts (protocol 2 change frames)."""

    def __init__(self) -> None:
        super().__init__()
        self.changes: list[tuple[str, str, str, str]] = []
        self.listener.on_contact_changed(self._change)

    def _change(self, change: Any) -> None:
        self.changes.append((change.contact_id, change.change, change.answered_by, change.reason))


async def replay(
    pace: float = 0.0,
    seed: int | None = None,
    blocks: list[bytes] | None = None,
    agent: type[Agent] = Agent,
    **options: Any,
) -> tuple[dict[str, Agent], Recording, Captured, AsteriskSource]:
    """The whole transcript through fake Asterisk -> source -> in-process hub -> listeners."""
    async with inprocess_hub() as hub:
        ami = FakeAsterisk()
        await ami.start()
        agents = {r: await agent().up(address_of(hub), r) for r in AGENTS}
        sink = Recording(hub)
        ctx, captured = context(sink)
        source = source_for(ami, **options)
        task = asyncio.get_running_loop().create_task(source.run(ctx))
        try:
            await asyncio.wait_for(source.connected.wait(), 10)
            await ami.play(blocks or BLOCKS, pace=pace, seed=seed)
            ends = 6  # every replay here plays the six calls through
            await until(lambda: sum(e["event"] == "ended" for e in sink.events) == ends, 20)
            await asyncio.sleep(0.2)  # let the last pops reach the listeners
        finally:
            ctx.stop.set()
            await asyncio.wait_for(task, 10)
            for agent in agents.values():
                await agent.listener.stop_listening()
            await ami.stop()
        return agents, sink, captured, source


def lifecycle(sink: Any) -> list[tuple[str, ...]]:
    return [
        (
            e["contact_id"],
            e["event"],
            e.get("resource", ""),
            e.get("from", ""),
            e.get("redirect", ""),
        )
        for e in sink.events
    ]


RING = [
    (A, "queued", "", "", ""),
    (A, "routed", "100", "", ""),
    (A, "routed", "101", "", ""),
    (A, "answered", "100", "", ""),
    (A, "ended", "", "", ""),
    (B, "queued", "", "", ""),
    (B, "routed", "100", "", ""),
    (B, "routed", "101", "", ""),
    (B, "answered", "100", "", ""),
    (B, "requeued", "", "", ""),
    (B, "transferred", "200", "100", ""),
    (B, "answered", "200", "", ""),
    (B, "ended", "", "", ""),
    (C, "queued", "", "", ""),
    (C, "routed", "100", "", ""),
    (C, "routed", "101", "", ""),
    (C, "answered", "100", "", ""),
    (C, "consulted", "3", "100", ""),
    (C, "answered", "3", "", ""),
    (C, "ended", "", "", ""),
    (D, "queued", "", "", ""),
    (D, "routed", "101", "", ""),
    (D, "recalled", "101", "", ""),
    (D, "ended", "", "", ""),
    (E, "queued", "", "", ""),
    (E, "routed", "101", "", ""),
    (E, "picked_up", "104", "", ""),
    (E, "answered", "104", "", ""),
    (E, "ended", "", "", ""),
    (F, "queued", "", "", ""),
    (F, "routed", "101", "", ""),
    (F, "queued", "", "", ""),
    (F, "redirected", "200", "", "nightshift"),
    (F, "answered", "200", "", ""),
    (F, "ended", "", "", ""),
]

# what each agent's screen shows, per the fixture README's table, popping on ring
RING_POPS = {
    "100": [(A, "", ""), (B, "", ""), (C, "", "")],
    "101": [
        (A, "", ""),
        (B, "", ""),
        (C, "", ""),
        (D, "", ""),
        (D, "", ""),
        (E, "", ""),
        (F, "", ""),
    ],
    "200": [(B, "100", ""), (F, "", "nightshift")],
    "104": [(E, "", "")],
    "3": [(C, "100", "")],
}
# popping on answer: only who took the call (D: nobody; E: the picker, not Bob)
ANSWER_POPS = {
    "100": [(A, "", ""), (B, "", ""), (C, "", "")],
    "101": [],
    "200": [(B, "100", ""), (F, "", "nightshift")],
    "104": [(E, "", "")],
    "3": [(C, "100", "")],
}


def test_recorded_pace_pops_each_agent_as_the_scenario_table_says() -> None:
    agents, sink, captured, _ = run(replay(pace=0.002))
    assert lifecycle(sink) == RING
    assert {r: a.pops for r, a in agents.items()} == RING_POPS
    assert not [line for line in captured.lines if line.startswith("ERROR")]


def test_all_at_once_in_random_pieces_gives_the_same_contacts() -> None:
    for seed in (1, 2, 3):
        _, sink, captured, _ = run(replay(seed=seed))
        assert lifecycle(sink) == RING, seed
        assert not [line for line in captured.lines if "WARNING AMI" in line]


def test_pop_on_answer_pops_only_who_took_the_call_with_the_hold_time_as_wait() -> None:
    agents, sink, _, _ = run(replay(pace=0.001, pop_on="answer"))
    assert {r: a.pops for r, a in agents.items()} == ANSWER_POPS
    alice = agents["100"].events[0]
    assert (alice.source, alice.destination, alice.queue_name) == (
        "+4989123456",
        "5551000",
        "support",
    )
    assert alice.wait_time == 1  # AgentConnect HoldTime: 1
    assert alice.contact_description == "Order question"
    assert [(i.key, i.value) for i in alice.contact_data] == [
        ("CUSTOMER_ID", "C-0815"),
        ("CustomerId", "C-0815"),
        ("caller_name", "Bob Caller"),
    ]
    carol = agents["200"].events[0]
    assert (carol.from_, carol.queue_name, carol.source) == ("100", "billing", "+4930555111")


# -- Asterisk going away and coming back -------------------------------------------------------------
def index_of(event: str, linkedid: str, nth: int = 1) -> int:
    """The position, in the recording, just after the nth `event` of the call `linkedid`."""
    found = 0
    for i, block in enumerate(BLOCKS):
        if (
            block.startswith(f"Event: {event}\r\n".encode())
            and f"Linkedid: {linkedid}\r\n".encode() in block
        ):
            found += 1
            if found == nth:
                return i + 1
    raise AssertionError(f"no {event} for {linkedid}")


async def two_sessions(
    first: list[bytes], outage: list[bytes], second: list[bytes], restart: bool, **options: Any
) -> tuple[dict[str, Agent], Recording, Captured, AsteriskSource]:
    """Play `first`, drop the link (Asterisk restarting or just the link), `outage` happens
    meanwhile (no one listening), then the source reconnects and `second` is played."""
    async with inprocess_hub() as hub:
        ami = FakeAsterisk()
        await ami.start()
        agents = {r: await Agent().up(address_of(hub), r) for r in AGENTS}
        sink = Recording(hub)
        ctx, captured = context(sink)
        source = source_for(ami, reconnect_max=0.3, **options)
        task = asyncio.get_running_loop().create_task(source.run(ctx))
        try:
            await asyncio.wait_for(source.connected.wait(), 10)
            await ami.play(first, seed=7)
            count = len(first)
            await until(
                lambda: (
                    source.mapper.calls
                    and sink.events
                    and sink.events[-1]["event"] == "answered"
                    or count == 0
                ),
                10,
            )
            await ami.stop()
            await until(lambda: not source.connected.is_set(), 10)
            ami.learn(outage)
            if restart:  # every call died with Asterisk
                ami.channels.clear()
                ami.waiting.clear()
            await ami.start()
            await asyncio.wait_for(source.connected.wait(), 10)
            await ami.play(second, seed=8)
            await until(lambda: sum(e["event"] == "ended" for e in sink.events) == 6, 20)
            await asyncio.sleep(0.2)
        finally:
            ctx.stop.set()
            await asyncio.wait_for(task, 10)
            for agent in agents.values():
                await agent.listener.stop_listening()
            await ami.stop()
        assert source.sessions == 2
        return agents, sink, captured, source


def test_link_drop_mid_call_loses_nothing_and_pops_nothing_twice() -> None:
    cut = index_of("AgentConnect", B)  # Alice has just answered B
    agents, sink, _, _ = run(two_sessions(BLOCKS[:cut], [], BLOCKS[cut:], restart=False))
    assert lifecycle(sink) == RING
    assert {r: a.pops for r, a in agents.items()} == RING_POPS
    assert all(not a.twice() for a in agents.values())


def test_a_call_that_started_while_the_link_was_down_is_learned_and_popped_where_it_is() -> None:
    start = index_of("Hangup", B, nth=6)  # B is over
    answered = index_of("AgentConnect", C)  # C came in and Alice answered it, unseen
    assert lifecycle_of(B, RING)[-1][1] == "ended"
    agents, sink, _, _ = run(
        two_sessions(BLOCKS[:start], BLOCKS[start:answered], BLOCKS[answered:], restart=False)
    )
    learned = [e for e in lifecycle(sink) if e[0] == C]
    assert learned == [
        (C, "routed", "100", "", ""),
        (C, "answered", "100", "", ""),
        (C, "consulted", "3", "100", ""),
        (C, "answered", "3", "", ""),
        (C, "ended", "", "", ""),
    ]
    assert agents["100"].pops == [(A, "", ""), (B, "", ""), (C, "", "")]
    assert agents["101"].pops.count((C, "", "")) == 0  # Bob's ring was over before we were back


class RemoteRestored(RemoteSink):
    """The sink of `spop source` beside the hub (RemoteSink), keeping every event sent."""

    def __init__(self, address: str) -> None:
        super().__init__(address, retry_for=5.0)
        self.events: list[dict[str, Any]] = []

    async def send(self, events: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        answer = await super().send(events, **options)
        self.events.extend(events)
        return answer


async def across_a_restart(
    first: list[bytes],
    outage: list[bytes],
    second: list[bytes],
    journal: Path,
    what: str,
    early: bool = False,
    last: str = "answered",
) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """`first` is played, then `what` restarts: `spop serve` with the source inside ("hub":
    the hub stops, its journal kept, and a new hub on the same journal starts; "nats hub": the
    same with the contacts in a NATS KV bucket), or `spop source` beside a hub that keeps
    running ("source"). `outage` happens meanwhile, and a new source (a new process: no memory
    of the calls) logs in again and `second` is played, until the six calls have ended
    (`early`: as soon as it has logged in, before Asterisk lists its calls). `last`: the
    event that `first` ends with. The lifecycle events each source sent."""
    ami = FakeAsterisk()
    await ami.start()
    options: dict[str, Any] = {"journal": str(journal)}
    nats = None
    if what == "nats hub":
        nats = NatsCluster(journal.parent / "nats", 1)
        options = {"backend": "nats", "nats_servers": nats.servers}

    async def one_source(hub: Any, blocks: list[bytes], done: Any) -> Any:
        sink = RemoteRestored(address_of(hub)) if what == "source" else Restored(hub)
        ctx, _ = context(sink)
        source = source_for(ami, reconnect_max=0.3)
        logins = len(ami.logins)
        task = asyncio.get_running_loop().create_task(source.run(ctx))
        try:
            if early and logins:  # the list comes 0.5 s late: the events are first
                ami.list_delay = 0.5
                await until(lambda: len(ami.logins) > logins, 10)
            else:
                await asyncio.wait_for(source.connected.wait(), 10)
            await ami.play(blocks, seed=7)
            await until(lambda: done(sink), 20)
            await asyncio.sleep(0.2)
        finally:
            ctx.stop.set()
            await asyncio.wait_for(task, 10)
            if isinstance(sink, RemoteSink):
                await sink.close()
        return sink

    def ends(sink: Any) -> set[str]:
        return {e["contact_id"] for e in sink.events if e["event"] == "ended"}

    def answered(sink: Any) -> bool:
        return bool(sink.events) and sink.events[-1]["event"] == last

    try:
        async with inprocess_hub(**options) as hub:
            before = await one_source(hub, first, answered)
            await ami.stop()
            ami.learn(outage)
            await ami.start()
            if what == "source":
                after = await one_source(hub, second, lambda s: len(ends(before) | ends(s)) == 6)
        if what != "source":
            async with inprocess_hub(**options) as hub:
                after = await one_source(hub, second, lambda s: len(ends(before) | ends(s)) == 6)
    finally:
        await ami.stop()
        if nats is not None:
            nats.close()
    return lifecycle(before), lifecycle(after)


def calls(rows: list[tuple[str, ...]]) -> dict[str, list[tuple[str, ...]]]:
    """Each call's lifecycle events, in order."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for row in rows:
        out.setdefault(row[0], []).append(row)
    return out


@pytest.mark.parametrize("what", ["hub", "nats hub", "source"])
def test_a_restart_mid_call_pops_nobody_twice_and_ends_the_calls(tmp_path: Path, what: str) -> None:
    """Alice has answered B when `spop serve` (the source inside) or `spop source` restarts:
    the new source learns B from Asterisk, the hub knows it (from its journal, or still), so
    nothing of B is sent again until its next step."""
    cut = index_of("AgentConnect", B)
    body = across_a_restart(BLOCKS[:cut], [], BLOCKS[cut:], tmp_path / "j", what)
    before, after = run(body)
    assert calls(before + after) == calls(RING)
    if what != "nats hub":  # a cluster's batches about different calls may finish in any order
        assert before + after == RING


@pytest.mark.parametrize("what", ["hub", "nats hub", "source"])
def test_a_calls_events_before_the_list_go_on_from_the_hubs_state(
    tmp_path: Path, what: str
) -> None:
    """Alice is rung for A when the restart comes; the new source's first events (Bob rung,
    Alice answering, the hang-ups) come before Asterisk's list of calls: A is taken up from
    the hub's state as it is met, so Bob is popped, Alice answers, and A ends."""
    cut = index_of("AgentCalled", A)
    body = across_a_restart(
        BLOCKS[:cut], [], BLOCKS[cut:], tmp_path / "j", what, early=True, last="routed"
    )
    before, after = run(body)
    assert calls(before + after) == calls(RING)


def after_block(*parts: bytes) -> int:
    """The position, in the recording, just after the first block holding all of `parts`."""
    return next(i + 1 for i, block in enumerate(BLOCKS) if all(p in block for p in parts))


@pytest.mark.parametrize("what", ["hub", "source"])
@pytest.mark.parametrize(
    ("moment", "last"),
    [("consulting", "consulted"), ("transferred", "answered")],
)
def test_a_restart_during_a_consultation_pops_nobody_twice(
    tmp_path: Path, what: str, moment: str, last: str
) -> None:
    """C: Alice holds the caller and consults 3 ("consulting": 3's leg is up), or has just
    handed the call to 3 ("transferred": her leg still up for a moment) when the restart comes.
    The hub's state says who was consulted and who has the call: 3 is not popped again, Alice
    is not "transferred" away nor said to answer again, and both get their `ended`."""
    cut = {
        "consulting": after_block(b"Event: Newstate", b"Local/3@xfer", b"ChannelStateDesc: Up"),
        "transferred": index_of("AttendedTransfer", C),
    }[moment]
    body = across_a_restart(BLOCKS[:cut], [], BLOCKS[cut:], tmp_path / "j", what, last=last)
    before, after = run(body)
    assert calls(before + after) == calls(RING)


def test_a_restart_of_spop_source_under_uvloop(tmp_path: Path) -> None:
    """As above for `spop source`, on the loop the CLI runs."""
    import uvloop

    cut = index_of("AgentConnect", B)
    body = across_a_restart(BLOCKS[:cut], [], BLOCKS[cut:], tmp_path / "j", "source")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        before, after = runner.run(asyncio.wait_for(body, 60))
    assert before + after == RING


@pytest.mark.parametrize("what", ["hub", "nats hub", "source"])
def test_a_call_that_hung_up_during_a_restart_ends_when_the_source_is_back(
    tmp_path: Path, what: str
) -> None:
    """B is transferred and hangs up while `spop serve` (the source inside) or `spop source`
    is down: the new source does not find it in Asterisk, and the hub has it open from this
    source: it ends."""
    cut = index_of("AgentConnect", B)
    over = index_of("Hangup", B, nth=6)
    outage = [b for b in BLOCKS[cut:over] if f"Linkedid: {B}".encode() in b]
    second = [b for b in BLOCKS[cut:] if b not in outage]
    before, after = run(across_a_restart(BLOCKS[:cut], outage, second, tmp_path / "j", what))
    missed = [  # while nobody listened: Asterisk does not tell them again
        (B, "requeued", "", "", ""),
        (B, "transferred", "200", "100", ""),
        (B, "answered", "200", "", ""),
    ]
    ended = (B, "ended", "", "", "")
    assert after[0] == ended  # at the first list of calls, before anything else
    expected = [row for row in RING if row not in missed and row != ended]
    assert calls(before + after[1:]) == calls(expected)
    if what != "nats hub":
        assert before + after[1:] == expected


@pytest.mark.parametrize("hub", ["down", "listener token"])
def test_a_hub_that_cannot_say_its_open_calls_does_not_hold_the_login(hub: str) -> None:
    """`spop source` starting while its hub is down (or with a token that may not read them):
    one warning, then Asterisk's events are read as ever; the hub is asked again at the next
    login."""

    async def body() -> tuple[list[str], bool]:
        ami = FakeAsterisk()
        await ami.start()
        async with contextlib.AsyncExitStack() as stack:
            running = await stack.enter_async_context(
                inprocess_hub(token="desk", source_token="secret")
            )
            address = address_of(running)
            if hub == "down":  # the port of a hub that has stopped: refused
                await stack.aclose()
            sink = RemoteSink(address, token="desk", retry_for=30.0)
            ctx, captured = context(sink)
            source = source_for(ami, reconnect_max=0.3)
            task = asyncio.get_running_loop().create_task(source.run(ctx))
            try:
                await asyncio.wait_for(source.connected.wait(), 5)
            finally:
                ctx.stop.set()
                await asyncio.wait_for(task, 10)
                await sink.close()
                await ami.stop()
        return [line for line in captured.lines if "open calls" in line], source.restored

    lines, restored = run(body())
    why = {
        "down": "cannot reach the hub",
        "listener token": "this token may not read a source's contacts",
    }[hub]
    assert len(lines) == 1, lines
    assert lines[0].startswith("WARNING the hub's open calls of source 'pbx' are unknown (")
    assert why in lines[0]
    assert lines[0].endswith("): calls already with an agent are popped there again")
    assert restored is False


def lifecycle_of(contact: str, table: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return [row for row in table if row[0] == contact]


def test_asterisk_restarting_ends_the_calls_it_dropped() -> None:
    answered = index_of("AgentConnect", C)
    d_start = next(
        i for i in range(answered, len(BLOCKS)) if f"Linkedid: {D}".encode() in BLOCKS[i]
    )
    rest = [b for b in BLOCKS[d_start:] if f"Linkedid: {C}".encode() not in b]
    agents, sink, _, _ = run(two_sessions(BLOCKS[:answered], [], rest, restart=True))
    c_events = [e for e in lifecycle(sink) if e[0] == C]
    assert c_events == [row for row in RING if row[0] == C][:4] + [(C, "ended", "", "", "")]
    assert [e for e in lifecycle(sink) if e[0] in (D, E, F)] == [
        row for row in RING if row[0] in (D, E, F)
    ]


# -- a wrong secret, missing read classes, malformed lines ---------------------------------------------
async def run_for(
    ami: FakeAsterisk, source: AsteriskSource, until_true: Any, blocks: list[bytes] | None = None
) -> tuple[Recording, Captured, bool]:
    async with inprocess_hub() as hub:
        sink = Recording(hub)
        ctx, captured = context(sink)
        task = asyncio.get_running_loop().create_task(source.run(ctx))
        try:
            if blocks is not None:
                await asyncio.wait_for(source.connected.wait(), 10)
                await ami.play(blocks, seed=3)
            ok = await until(lambda: until_true(captured, sink), 10)
            alive = not task.done()
        finally:
            ctx.stop.set()
            await asyncio.wait_for(task, 10)
            await ami.stop()
        return sink, captured, ok and alive


def test_wrong_secret_is_a_clear_error_naming_manager_conf_and_is_retried() -> None:
    async def body() -> tuple[Recording, Captured, bool, list[tuple[str, bool]]]:
        ami = FakeAsterisk()
        await ami.start()
        source = source_for(ami, secret="not-the-secret", reconnect_max=0.1)
        sink, captured, ok = await run_for(ami, source, lambda c, s: len(ami.logins) >= 2)
        return sink, captured, ok, ami.logins

    _, captured, ok, logins = run(body())
    assert ok and logins[:2] == [("spop", False), ("spop", False)]
    errors = [line for line in captured.lines if line.startswith("ERROR")]
    assert errors[0] == (
        "ERROR Asterisk refused the login of AMI user 'spop' (Authentication failed): check secret= in "
        "the [spop] section of Asterisk's manager.conf (and that permit= allows this host), and the "
        "secret spop uses ([sources.NAME] secret or SPOP_ASTERISK_SECRET); then "
        "`asterisk -rx 'manager reload'`"
    )
    assert not any("not-the-secret" in line for line in captured.lines)


@pytest.mark.parametrize("missing", ["agent", "user", "dialplan", "call"])
def test_a_missing_read_class_is_named_with_the_fix(missing: str) -> None:
    async def body() -> tuple[Recording, Captured, bool]:
        ami = FakeAsterisk(read=ALL_CLASSES - {missing})
        await ami.start()
        source = source_for(ami)
        return await run_for(
            ami, source, lambda c, s: any(f"'{missing}' events" in line for line in c.lines), BLOCKS
        )

    _, captured, ok = run(body())
    assert ok, captured.lines
    errors = [line for line in captured.lines if line.startswith("ERROR")]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"ERROR AMI user 'spop' gets no '{missing}' events (")
    assert errors[0].endswith(
        "pops will be missing. Fix: read = call,agent,user,dialplan in the [spop] section of "
        "Asterisk's manager.conf, then `asterisk -rx 'manager reload'`"
    )


QUEUE_RAN = {
    "Event": "Newexten",
    "Application": "Queue",
    "Uniqueid": "1.1",
    "Privilege": "dialplan,all",
}
HUNG_UP = {"Event": "Hangup", "Uniqueid": "1.1", "Privilege": "call,all"}


@pytest.mark.parametrize("dropped", [False, True])
def test_a_queue_call_cut_by_a_link_drop_is_no_missing_read_class(dropped: bool) -> None:
    """Queue() ran, then the link dropped before the queue events: they came while nobody read,
    which says nothing of manager.conf. Without a drop, the same is the missing 'agent' class."""
    watch = ClassWatch("spop")
    assert watch.see(QUEUE_RAN) is None
    if dropped:
        watch.link_dropped()
    said = watch.see(HUNG_UP)
    if dropped:
        assert said is None
    else:
        assert said == (
            "AMI user 'spop' gets no 'agent' events (Queue() ran, but no queue event came): pops "
            "will be missing. Fix: read = call,agent,user,dialplan in the [spop] section of "
            "Asterisk's manager.conf, then `asterisk -rx 'manager reload'`"
        )


def dialplan(uid: str) -> dict[str, str]:
    return {"Event": "Newexten", "Uniqueid": uid, "Privilege": "dialplan,all"}


def test_the_calls_listed_at_login_are_no_missing_call_class() -> None:
    """A restart in the middle of calls: their dialplan events come, their Newchannel came
    before we read. Only the channels Asterisk did not list (new since) count, from the list
    on: the 20th of their events without a 'call' class event names it, not the 19th."""
    watch = ClassWatch("spop")
    assert [watch.see(dialplan("1.1")) for _ in range(30)] == [None] * 30  # before the list
    watch.listed({"1.1"})
    assert [watch.see(dialplan("1.1")) for _ in range(30)] == [None] * 30  # a listed channel
    assert [watch.see(dialplan("2.1")) for _ in range(ClassWatch.SAMPLE - 1)] == [None] * 19
    assert watch.see(dialplan("2.1")) == (
        "AMI user 'spop' gets no 'call' events (channel events came, but never Newchannel or "
        "Hangup): pops will be missing. Fix: read = call,agent,user,dialplan in the [spop] "
        "section of Asterisk's manager.conf, then `asterisk -rx 'manager reload'`"
    )


def test_a_call_class_event_clears_the_count() -> None:
    watch = ClassWatch("spop")
    watch.listed(set())
    watch.see({"Event": "Newchannel", "Uniqueid": "2.1", "Privilege": "call,all"})
    assert [watch.see(dialplan("2.1")) for _ in range(50)] == [None] * 50


def test_asterisk_timestamps_keep_their_spacing_on_this_hosts_clock() -> None:
    """Asterisk's clock 30 s ahead: each stamp is moved by the smallest lag seen (0.05 s), so
    the events keep their spacing and agree with a list of calls timed here."""
    clock = EventClock()
    now = 1_800_000_000.0
    seen = [
        clock.at({"Timestamp": f"{now + 30 - 0.2:.6f}"}, now),  # read 0.2 s late: lag 29.8
        clock.at({"Timestamp": f"{now + 30 + 0.95:.6f}"}, now + 1.0),  # lag 29.95: the best
        clock.at({"Timestamp": f"{now + 30 + 1.5:.6f}"}, now + 1.6),  # read 0.1 s late
    ]
    # the first is timed when read (its lag is the best seen yet), the next ones by the best
    assert [round(t.timestamp(), 3) for t in seen] == [now, now + 1.0, now + 1.55]
    assert clock.at({}, now + 2).timestamp() == now + 2  # no stamp: when it is read
    far = f"{now + EventClock.LIMIT + 1:.0f}"
    assert clock.at({"Timestamp": far}, now + 2).timestamp() == now + 2  # not a clock
    assert clock.at({"Timestamp": "soon"}, now + 2).timestamp() == now + 2
    clock.reset()  # a new session: the lag is learned again
    assert clock.at({"Timestamp": f"{now + 10:.6f}"}, now + 3).timestamp() == now + 3


def test_a_slow_list_of_calls_keeps_the_link_and_names_the_setting() -> None:
    """CoreShowChannels answered after connect_timeout: the list is given up, not the link (a
    reconnect would lose the events of each gap and ask again), its late answer is no event,
    and the calls still pop as they come."""

    async def body() -> tuple[Recording, Captured, bool, AsteriskSource]:
        ami = FakeAsterisk(list_delay=1.0)
        await ami.start()
        source = source_for(ami, connect_timeout=0.4, reconnect_max=0.3)
        sink, captured, ok = await run_for(
            ami,
            source,
            lambda _, sink: sum(e["event"] == "ended" for e in sink.events) == 6,
            BLOCKS,
        )
        return sink, captured, ok, source

    sink, captured, ok, source = run(body())
    assert ok
    assert source.sessions == 1
    assert lifecycle(sink) == RING
    assert [line for line in captured.lines if "list its calls" in line] == [
        "WARNING Asterisk did not list its calls (CoreShowChannels, QueueStatus) within "
        "connect_timeout (0.4 s): calls in progress are not learned this time (raise "
        "connect_timeout for a PBX this busy); events are read on"
    ]


def test_all_read_classes_give_no_class_error() -> None:
    _, _, captured, _ = run(replay(seed=11))
    assert not [line for line in captured.lines if "events (" in line]


def test_malformed_lines_are_logged_and_no_call_is_lost() -> None:
    first_called = index_of("AgentCalled", A)
    damaged = list(BLOCKS)
    damaged[first_called - 1] = damaged[first_called - 1].replace(
        b"Queue: support\r\n", b"Queue: support\r\nthis line has no colon\r\n"
    )
    damaged.insert(
        first_called, b"Event: Newchannel\r\nPrivilege: call,all\r\n\x00\x01 binary junk\r\n\r\n"
    )
    agents, sink, captured, _ = run(replay(seed=5, blocks=damaged))
    assert lifecycle(sink) == RING
    assert {r: a.pops for r, a in agents.items()} == RING_POPS
    warnings = [line for line in captured.lines if line.startswith("WARNING AMI")]
    assert warnings == [
        "WARNING AMI: not a 'Key: Value' line, skipped: b'this line has no colon'",
        "WARNING AMI: not a 'Key: Value' line, skipped: b'\\x00\\x01 binary junk'",
    ]


def test_asterisk_filters_what_the_source_does_not_need() -> None:
    async def body() -> tuple[int, list[str]]:
        ami = FakeAsterisk()
        await ami.start()
        source = source_for(ami)
        async with inprocess_hub() as hub:
            ctx, _ = context(HubSink(hub))
            task = asyncio.get_running_loop().create_task(source.run(ctx))
            await asyncio.wait_for(source.connected.wait(), 10)
            sent = await ami.play(BLOCKS, seed=1)
            ctx.stop.set()
            await task
        await ami.stop()
        return sent, ami.actions

    sent, actions = run(body())
    assert actions == ["Login", "Filter", "Filter", "Filter", "CoreShowChannels", "QueueStatus"]
    assert (len(BLOCKS), sent) == (1142, 283)  # 76 of the 435 VarSets are SPOP_ ones


def test_a_refused_filter_is_a_hint_and_the_calls_still_pop() -> None:
    async def body() -> tuple[Recording, Captured, bool]:
        ami = FakeAsterisk(allow_filter=False, allow_channels=False)
        await ami.start()
        source = source_for(ami)
        return await run_for(
            ami, source, lambda c, s: sum(e["event"] == "ended" for e in s.events) == 6, BLOCKS
        )

    sink, captured, ok = run(body())
    assert ok and lifecycle(sink) == RING
    hint = next(line for line in captured.lines if "did not take the event filter" in line)
    assert hint.startswith("INFO Asterisk did not take the event filter (Permission denied)")
    assert "eventfilter=Event: (Newchannel|Hangup|" in hint
    assert any(
        line.startswith("ERROR AMI user 'spop' may not list channels (Permission denied)")
        and "add reporting to write=" in line
        for line in captured.lines
    )


def test_the_same_contacts_under_uvloop() -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        agents, sink, _, _ = runner.run(asyncio.wait_for(replay(seed=21), 60))
    assert lifecycle(sink) == RING


# -- the command line: spop source NAME --check, and standalone beside a hub -------------------------------
def write_config(path: Path, port: int, address: str = "6000@127.0.0.1", **extra: str) -> Path:
    lines = [
        f'[server]\naddress = "{address}"\n',
        "[sources.pbx]",
        'type = "asterisk"',
        f"port = {port}",
    ]
    lines += ['resource_names = { pick = "104" }']
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def spop(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spop_cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


def test_beside_the_hub_each_event_has_an_id_so_a_resend_is_applied_once() -> None:
    """`spop source` sends over the network: a batch whose answer was lost with the connection
    is sent again, so each event gets an id of its own (this run's, then its number)."""

    async def body() -> tuple[list[str], str, dict[str, Any], dict[str, Any], int]:
        async with inprocess_hub() as hub:
            sink = RemoteSink(address_of(hub))
            ctx, _ = context(sink)
            outbox = Outbox(ctx)
            outbox.put([{"contact_id": "k", "event": "queued", "media": "telephone"}])
            outbox.put([{"contact_id": "k", "event": "routed", "resource": "100"}])
            batch = list(outbox.events)
            first = await sink.send(batch)
            again = await sink.send(batch)  # its answer lost: sent again on a new connection
            await sink.close()
            return (
                [e["id"] for e in batch],
                outbox.run_id,
                first,
                again,
                hub.status()["counters"]["duplicate_events"],
            )

    ids, run_id, first, again, duplicates = run(body())
    assert run_id.startswith("ami-") and len(run_id) == 12
    assert ids == [f"{run_id}-1", f"{run_id}-2"]
    assert first == {"applied": 2, "pops": [f"{run_id}-2"]}
    assert again == {"applied": 2, "pops": []}
    assert duplicates == 2


@pytest.mark.parametrize("good", [True, False])
def test_check_logs_in_says_what_it_sees_and_never_prints_the_secret(
    tmp_path: Path, good: bool
) -> None:
    async def body() -> tuple[int, str]:
        ami = FakeAsterisk()
        await ami.start()
        blocks = BLOCKS[: index_of("AgentConnect", A)]
        ami.learn(blocks)  # A is in progress
        config = write_config(tmp_path / "spop.toml", ami.port)
        secret = "spop-secret" if good else "wrong-secret-123"
        env = {"SPOP_ASTERISK_SECRET": secret, "SPOP_DIAG_DIR": str(tmp_path / "diag")}
        try:
            return await spop("source", "pbx", "--check", "--config", str(config), env=env)
        finally:
            await ami.stop()

    code, output = run(body())
    assert "spop-secret" not in output and "wrong-secret-123" not in output
    if good:
        assert code == 0, output
        lines = [line for line in output.splitlines() if line.startswith("pbx: ")]
        assert (
            lines[0]
            == f"pbx: Asterisk Call Manager/11.0.0 at 127.0.0.1:{lines[0].rsplit(':', 1)[1].split(',')[0]}, logged in as spop"
        )
        # at the cut: the caller's two Local halves, Alice's two, and Bob's second half, still hanging up
        assert lines[1:3] == ["pbx: 5 channels in 1 calls", "pbx: queues: none; 0 callers waiting"]
        assert lines[4] == "pbx: needs read = call,agent,user,dialplan in [spop] of manager.conf"
    else:
        assert code == 3, output
        assert (
            "Asterisk refused the login of AMI user 'spop' (Authentication failed): check secret= in the [spop] section"
            in output
        )


def test_standalone_source_beside_a_hub_pops_the_agents(tmp_path: Path) -> None:
    with HubProcess(tmp_path / "hub") as hub:

        async def body() -> dict[str, list[tuple[str, str, str]]]:
            ami = FakeAsterisk()
            await ami.start()
            agents = {r: await Agent().up(hub.address, r) for r in AGENTS}
            config = write_config(tmp_path / "spop.toml", ami.port, hub.address)
            env = {
                **os.environ,
                "SPOP_ASTERISK_SECRET": "spop-secret",
                "SPOP_DIAG_DIR": str(tmp_path / "diag"),
            }
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "spop_cli",
                "source",
                "pbx",
                "--config",
                str(config),
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
            try:
                await ami.session(timeout=30)
                await ami.play(BLOCKS, pace=0.002)
                want = sum(len(p) for p in RING_POPS.values())
                await until(lambda: sum(len(a.pops) for a in agents.values()) >= want, 30)
                await asyncio.sleep(0.3)
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 20)
                for agent in agents.values():
                    await agent.listener.stop_listening()
                await ami.stop()
            assert proc.returncode == 0
            return {r: a.pops for r, a in agents.items()}

        assert run(body(), timeout=90) == RING_POPS


# -- configuration -------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


def test_the_commented_example_in_config_example_toml_is_a_valid_source(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from spop_cli.cli import cli

    text = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    block = text[text.index("# [sources.pbx]") :].splitlines()
    live = [line[2:] for line in block if line.startswith("# ") and not line.startswith("# #")]
    config = tmp_path / "spop.toml"
    config.write_text("\n".join(live) + "\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(config)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("port = 70000", "sources.pbx.port = 70000: must be a port number"),
        ("port = 0", "sources.pbx.port = 0: must be a port number"),
        ('pop_on = "hangup"', 'sources.pbx.pop_on = "hangup": must be "ring" or "answer"'),
        (
            'agent_patterns = ["(unclosed"]',
            "sources.pbx.agent_patterns = [\"(unclosed\"]: bad regular expression '(unclosed': missing )",
        ),
        (
            'agent_patterns = ["^PJSIP/"]',
            "sources.pbx.agent_patterns = [\"^PJSIP/\"]: '^PJSIP/' has no group: group 1 must "
            'capture the agent\'s resource, e.g. "^PJSIP/(\\w+)-"',
        ),
        (
            "queue_names = { support = 5 }",
            'sources.pbx.queue_names = {"support": 5}: must be a table of strings',
        ),
        ("internal_calls = 1", "sources.pbx.internal_calls = 1: must be true or false"),
        (
            'hostname = "pbx"',
            'sources.pbx.hostname = "pbx": unknown key (expected one of host, port,',
        ),
        ("reconnect_max = 0", "sources.pbx.reconnect_max = 0: must be more than 0"),
    ],
)
def test_config_check_names_the_asterisk_key_at_fault(
    tmp_path: Path, line: str, message: str
) -> None:
    from click.testing import CliRunner

    from spop_cli.cli import cli

    config = tmp_path / "spop.toml"
    config.write_text(f'[sources.pbx]\ntype = "asterisk"\n{line}\n', encoding="utf-8")
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(config)])
    assert result.exit_code == 12
    assert message in result.output, result.output


def test_port_limits_just_inside_are_accepted() -> None:
    for port in (1, 65535):
        assert AsteriskSource({"port": port}).port == port


def test_no_secret_anywhere_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from spop_cli.sources import SourceError

    monkeypatch.delenv("SPOP_ASTERISK_SECRET", raising=False)
    with pytest.raises(SourceError) as raised:
        _ = AsteriskSource({}).secret
    assert (
        str(raised.value)
        == "secret: no AMI secret: set secret in the table or SPOP_ASTERISK_SECRET"
    )
    monkeypatch.setenv("SPOP_ASTERISK_SECRET", "from-env")
    source = AsteriskSource({})
    assert source.secret == "from-env" and "from-env" not in repr(source)


def test_source_list_shows_the_builtin_asterisk() -> None:
    from click.testing import CliRunner

    from spop_cli.cli import cli

    result = CliRunner().invoke(cli, ["source", "--list"])
    assert "asterisk     Asterisk / FreePBX calls over the Manager Interface (AMI)" in result.output


def test_no_secret_while_running_is_logged_and_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPOP_ASTERISK_SECRET", raising=False)

    async def body() -> tuple[Captured, bool, list[tuple[str, bool]]]:
        ami = FakeAsterisk()
        await ami.start()
        source = AsteriskSource({"port": ami.port, "reconnect_max": 0.1})
        done = lambda c, s: sum("no AMI secret" in line for line in c.lines) >= 2  # noqa: E731
        _, captured, ok = await run_for(ami, source, done)
        return captured, ok, ami.logins

    captured, ok, logins = run(body())
    assert ok and logins == []  # nothing sent to Asterisk without a secret
    assert (
        captured.lines[0]
        == "ERROR secret: no AMI secret: set secret in the table or SPOP_ASTERISK_SECRET"
    )


def test_check_with_asterisk_unreachable_exits_3(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    config = write_config(tmp_path / "spop.toml", port)
    env = {"SPOP_ASTERISK_SECRET": "x", "SPOP_DIAG_DIR": str(tmp_path / "diag")}
    code, output = run(spop("source", "pbx", "--check", "--config", str(config), env=env))
    assert code == 3
    assert f"pbx: cannot reach Asterisk AMI at 127.0.0.1:{port}: " in output


def test_ringall_agents_who_did_not_answer_learn_the_call_went_elsewhere() -> None:
    """Scenario A rings Alice (100) and Bob (101); Alice answers: Bob's card is told so."""
    agents, _, _, _ = run(replay(pace=0.001, agent=FollowingAgent))
    bob = [c for c in agents["101"].changes if c[0] == A]  # type: ignore[attr-defined]
    alice = [c for c in agents["100"].changes if c[0] == A]  # type: ignore[attr-defined]
    # `answered` once Bob's pop was acked, `withdrawn` if it was still on its way (timing); either
    # way it names who answered and why
    assert bob[0][2:] == ("100", "answered elsewhere")
    assert alice[0][1:3] == ("answered", "100")
    assert alice[-1][1] == "ended"


def test_check_against_a_port_that_never_sends_the_banner_says_so(tmp_path: Path) -> None:
    """It printed "cannot reach Asterisk AMI at …: " with nothing after the colon (an
    exception with no text of its own)."""

    async def body() -> tuple[int, str, int]:
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        config = write_config(tmp_path / "spop.toml", port)
        with config.open("a", encoding="utf-8") as file:
            file.write("connect_timeout = 0.5\n")
        env = {"SPOP_ASTERISK_SECRET": "x", "SPOP_DIAG_DIR": str(tmp_path / "diag")}
        try:
            code, output = await spop("source", "pbx", "--check", "--config", str(config), env=env)
        finally:
            silent.close()
        return code, output, port

    code, output, port = run(body())
    assert code == 3
    assert (
        f"pbx: cannot reach Asterisk AMI at 127.0.0.1:{port}: "
        "no banner or answer within connect_timeout (0.5 s)"
    ) in output


def test_check_without_an_ami_secret_is_a_configuration_error_exit_12(tmp_path: Path) -> None:
    """cli.md: exit 12 for a source table that cannot be used, the message naming the key; it
    was 3, the status of a link that is down."""
    config = write_config(tmp_path / "spop.toml", 5038)
    env = {"SPOP_DIAG_DIR": str(tmp_path / "diag"), "SPOP_ASTERISK_SECRET": ""}
    code, output = run(spop("source", "pbx", "--check", "--config", str(config), env=env))
    assert code == 12
    assert (
        "spop: error: pbx: secret: no AMI secret: set secret in the table or SPOP_ASTERISK_SECRET"
        in output
    )


# -- a busy PBX at full speed into spop serve: the source's batches in flight ----------------------
# Inside `spop serve` the source does not wait for a batch's journal commit before sending the next
# (up to Outbox.IN_FLIGHT): the hub must still apply each call's events in the order they were
# sent. It did not: a batch about a call still in an earlier batch's commit waited for it, but a
# later batch (about another of its calls, or sent while it was being woken) went first. Seen as
# `hub refused routed of contact …: contact_ended` / `time_backwards` / `unknown_contact`, calls
# with no pop, pops with every field empty (`routed` before `queued`), contacts never ended.
BUSY = busy_pbx(10, groups=10)  # 60 calls, ten of each recorded one in progress at once
BUSY_CALLS = 60
# what differs from run to run in a pop, a change or a contact's state: ids and times
VOLATILE = frozenset(
    ["id", "created_at", "at", "wait_time", "talk_time", "last_at", "last_seen", "segment_start"]
)
TIMES = ("answered_at", "ended_seen")  # kept as whether they are set


class InFlight(HubSink):
    """The sink `spop serve` gives its sources (so batches go in flight, as there), keeping the
    events the hub applied in the order they were sent."""

    def __init__(self, hub: Any) -> None:
        super().__init__(hub)
        self.batches: list[list[dict[str, Any]]] = []

    async def send(self, events: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
        applied: list[dict[str, Any]] = []
        self.batches.append(applied)  # its place: the order sent, not the order answered
        answer = await super().send(events, **options)
        skipped = {refusal.index for refusal in answer.get("refused", ())}
        applied.extend(e for i, e in enumerate(events) if i not in skipped)
        return answer

    @property
    def events(self) -> list[dict[str, Any]]:
        return [event for batch in self.batches for event in batch]


def journalled_calls(path: Path) -> dict[str, dict[str, Any]]:
    """What the hub committed of each call: its pops (by resource and rank among the call's pops
    to it: whether done, body), its changes in order (resource, whether done, body) and its last
    state; ids and times left out. A pop withdrawn before its commit (a ringall pop answered
    elsewhere in the same batch, say) is never written: only its changes name it."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT id, contact_id, resource, body, done FROM pops ORDER BY rowid")
        rows = rows.fetchall()
        states = db.execute("SELECT contact_id, state FROM contacts").fetchall()
    calls: dict[str, dict[str, Any]] = {}
    ranks: dict[tuple[str, str], dict[str, int]] = {}

    def rank(contact: str, resource: str, pop_id: str) -> tuple[str, int]:
        seen = ranks.setdefault((contact, resource), {})
        return resource, seen.setdefault(pop_id, len(seen))

    for pop_id, contact, resource, body, done in rows:
        call = calls.setdefault(contact, {"pops": {}, "changes": []})
        frame = orjson.loads(body)
        kind = frame["op"]
        item = {k: v for k, v in frame[kind].items() if k not in VOLATILE}
        if kind == "pop":
            call["pops"][rank(contact, resource, pop_id)] = (done, item)
        else:
            item["pop_id"] = rank(contact, resource, item["pop_id"])
            call["changes"].append((resource, done, item))
    for contact, raw in states:
        state = {k: v for k, v in orjson.loads(raw).items() if k not in VOLATILE}
        for name in TIMES:
            state[name] = state.get(name) is not None
        state["following"] = {r: rank(contact, r, p) for r, p in state["following"].items()}
        calls.setdefault(contact, {"pops": {}, "changes": []})["state"] = state
    return calls


def by_call(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The lifecycle events of each call, in order, without their times."""
    calls: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        calls.setdefault(event["contact_id"], []).append(
            {k: v for k, v in event.items() if k != "at"}
        )
    return calls


async def replay_busy(
    journal: Path, **play: Any
) -> tuple[dict[str, list[dict[str, Any]]], list[str], dict[str, dict[str, Any]]]:
    """BUSY through fake Asterisk -> the source inside an in-process hub with a journal, as `spop
    serve` runs it. Returns each call's lifecycle events, the source's log, and what the hub
    committed of each call."""
    async with inprocess_hub(journal=str(journal)) as hub:
        ami = FakeAsterisk()
        await ami.start()
        sink = InFlight(hub)
        ctx, captured = context(sink)
        source = source_for(ami)
        task = asyncio.get_running_loop().create_task(source.run(ctx))
        try:
            await asyncio.wait_for(source.connected.wait(), 10)
            await ami.play(BUSY, **play)

            def over() -> bool:
                ended = sum(e["event"] == "ended" for e in sink.events)
                return ended == BUSY_CALLS or any("refused" in line for line in captured.lines)

            await until(over, 30)
            await asyncio.sleep(0.2)  # anything still on its way (a refusal's rest, sent again)
        finally:
            ctx.stop.set()
            await asyncio.wait_for(task, 10)
            await ami.stop()
        events = by_call(sink.events)
    return events, captured.lines, journalled_calls(journal)  # the hub stopped: all committed


@functools.cache
def slow_busy_replay() -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """The same calls 1 ms apart: every batch committed before the next is sent."""
    with tempfile.TemporaryDirectory() as tmp:
        events, lines, calls = run(replay_busy(Path(tmp) / "journal.sqlite3", pace=0.001))
    assert [line for line in lines if line.startswith(("ERROR", "WARNING"))] == []
    return events, calls


# a backlog then one event a turn of the loop: batches in flight on either loop (the old code
# failed 5 of 5 runs on each); at once in random pieces: in flight on uvloop only (5 of 5 there)
@pytest.mark.parametrize(
    ("loop", "play"),
    [
        ("asyncio", "backlog then one a turn"),
        ("uvloop", "backlog then one a turn"),
        ("uvloop", "random pieces"),
    ],
)
def test_a_busy_pbx_at_full_speed_gives_every_call_what_a_slow_replay_gives(
    loop: str, play: str, tmp_path: Path
) -> None:
    """`spop serve` takes the source's batches without waiting for the commits before them; the
    calls still come out exactly as when every batch is committed before the next is sent."""
    import uvloop

    options = {"burst": 500} if play == "backlog then one a turn" else {"seed": 7}
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        events, lines, calls = runner.run(
            asyncio.wait_for(replay_busy(tmp_path / "journal.sqlite3", **options), 60)
        )
    assert [line for line in lines if line.startswith(("ERROR", "WARNING"))] == []
    slow_events, slow_calls = slow_busy_replay()
    assert len(slow_calls) == BUSY_CALLS
    assert all(call["state"]["ended_seen"] for call in slow_calls.values())
    assert events == slow_events
    assert calls.keys() == slow_calls.keys()
    for contact, call in calls.items():
        slow = slow_calls[contact]
        assert (call["state"], call["changes"]) == (slow["state"], slow["changes"]), contact
        # every pop written is the slow replay's; one not written was withdrawn before its commit
        assert {k: slow["pops"].get(k) for k in call["pops"]} == call["pops"], contact
        assert all(slow["pops"][k][0] == 1 for k in slow["pops"].keys() - call["pops"].keys())


# -- the outbox inside the hub: a refused event, a journal that cannot commit -----------------------
def contact_event(contact: str, kind: str, second: int, **extra: Any) -> dict[str, Any]:
    return {"contact_id": contact, "event": kind, "at": f"2026-03-02T09:00:{second:02d}Z", **extra}


async def outbox_in(hub: Any) -> tuple[Outbox, Captured, asyncio.Task[None]]:
    ctx, captured = context(HubSink(hub))
    outbox = Outbox(ctx)
    return outbox, captured, asyncio.get_running_loop().create_task(outbox.run())


async def settled(outbox: Outbox) -> None:
    await until(lambda: not outbox.in_flight and not outbox.events, 5)
    await asyncio.sleep(0.05)


def test_a_refused_event_inside_the_hub_does_not_put_the_rest_of_its_batch_after_later_ones(
    tmp_path: Path,
) -> None:
    """A batch with a refused event in the middle, and the next batch already in flight: the
    events after the refused one are applied in their place (sent again, they came after the
    next batch: `a`'s `routed` was then refused as going back in time and its pop lost)."""

    async def body() -> None:
        async with inprocess_hub(journal=str(tmp_path / "journal.sqlite3")) as hub:
            outbox, captured, runner = await outbox_in(hub)
            outbox.put(
                [
                    contact_event("a", "queued", 0, source="+49891234"),
                    contact_event("x", "answered", 1, resource="1001"),  # the hub knows no x
                    contact_event("a", "routed", 2, resource="1001"),
                ]
            )
            while not outbox.in_flight:
                await asyncio.sleep(0)
            outbox.put([contact_event("a", "answered", 3, resource="1001")])
            await settled(outbox)
            runner.cancel()
            errors = [line for line in captured.lines if line.startswith("ERROR")]
            assert errors == [
                "ERROR hub refused answered of contact x: unknown_contact: no contact 'x': start it "
                "with queued or routed (event 1); skipping it"
            ]
            assert outbox.sent == 3
            state = hub.contacts.state("a")
            assert (state["holder"], state["source"], list(state["following"])) == (
                "1001",
                "+49891234",
                ["1001"],
            )

    run(body())


def test_a_journal_that_cannot_commit_is_waited_out_not_taken_for_a_refused_event(
    tmp_path: Path,
) -> None:
    """The hub answers 503 journal_unavailable (nothing applied): the outbox sends the batch
    again after its backoff. (It took the 503 for a refusal of the first event: skipped, lost.)"""
    path = tmp_path / "journal.sqlite3"

    async def body() -> None:
        async with inprocess_hub(journal=str(path)) as hub:
            hub.journal._db.execute("PRAGMA busy_timeout = 0")
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            outbox, captured, runner = await outbox_in(hub)
            outbox.put(
                [
                    contact_event("a", "queued", 0, source="+49891234"),
                    contact_event("a", "routed", 1, resource="1001"),
                ]
            )
            assert await until(lambda: any("did not take" in x for x in captured.lines), 5)
            blocker.execute("ROLLBACK")
            blocker.close()
            assert await until(lambda: outbox.sent == 2, 5)
            runner.cancel()
            assert [line for line in captured.lines if "hub " in line] == [
                "WARNING hub did not take 2 events (the journal cannot be written (database is "
                "locked): nothing was accepted; retry later); retrying in 0.5 s"
            ]
            state = hub.contacts.state("a")
            assert (state["source"], list(state["following"])) == ("+49891234", ["1001"])

    run(body())
