"""The Asterisk source end to end: a fake AMI server replays a real Asterisk 22's recorded stream
(shared/fixtures/asterisk) to the real source, which feeds a real hub, which pops real listeners.
Paced and at once in random pieces, through a restart of Asterisk, with a wrong secret, missing
read classes and malformed lines."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fake_ami import FakeAsterisk, transcript_blocks
from hubproc import Counting, address_of, inprocess_hub, run, until
from spop_cli.sources import HubSink, SourceContext
from spop_cli.sources.asterisk import AsteriskSource

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

    async def send(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        answer = await self.inner.send(events)
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


async def replay(
    pace: float = 0.0, seed: int | None = None, blocks: list[bytes] | None = None, **options: Any
) -> tuple[dict[str, Agent], Recording, Captured, AsteriskSource]:
    """The whole transcript through fake Asterisk -> source -> in-process hub -> listeners."""
    async with inprocess_hub() as hub:
        ami = FakeAsterisk()
        await ami.start()
        agents = {r: await Agent().up(address_of(hub), r) for r in AGENTS}
        sink = Recording(hub)
        ctx, captured = context(sink)
        source = source_for(ami, **options)
        task = asyncio.get_running_loop().create_task(source.run(ctx))
        try:
            await asyncio.wait_for(source.connected.wait(), 10)
            await ami.play(blocks or BLOCKS, pace=pace, seed=seed)
            ends = 6 if blocks is None else None
            await until(lambda: sum(e["event"] == "ended" for e in sink.events) == ends, 20)
            await asyncio.sleep(0.2)  # let the last pops reach the listeners
        finally:
            ctx.stop.set()
            await asyncio.wait_for(task, 10)
            for agent in agents.values():
                await agent.listener.stop_listening()
            await ami.stop()
        return agents, sink, captured, source


def lifecycle(sink: Recording) -> list[tuple[str, ...]]:
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
