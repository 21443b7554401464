"""Contact updates (protocol 2): real hubs, real sockets, real listeners.

Each listener popped for a contact follows it: answered (here or elsewhere), consulted,
transferred away, conferenced, requeued, withdrawn, ended. docs/contacts.md "Updates" and
docs/protocol.md "Contact updates".
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hubproc import (
    HubProcess,
    RawClient,
    address_of,
    http_post,
    inprocess_hub,
    run,
    until,
)
from spop_cli import client
from spop_cli.hub.contacts import ContactTracker
from spop_cli.listener.core import AsyncListener
from spop_cli.model import ContactChange, ListenerStatus
from spop_cli.scenario import builtin_names, load_scenario, timeline

START = datetime(2024, 5, 14, 9, 0, 0, tzinfo=UTC)

# what a ringall agent who did not answer (1002) learns when 1001 answers, on every backend
ANSWERED_ELSEWHERE = [
    (
        "withdrawn",
        "1002",
        {"answered_by": "1001", "talk_time": 0, "wait_time": 0, "reason": "answered elsewhere"},
    )
]


def runners() -> list[Any]:
    """Plain asyncio, and uvloop (the CLI's loop) where installed."""
    out: list[Any] = [pytest.param(asyncio.run, id="asyncio")]
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return out
    return [*out, pytest.param(uvloop.run, id="uvloop")]


def _journal(on: bool, tmp_path: Any) -> dict[str, Any]:
    return {"journal": str(tmp_path / "journal.sqlite3")} if on else {}


class Follower:
    """An AsyncListener that asks for updates and records pops and changes in order."""

    def __init__(self, media: str = "telephone", hold: asyncio.Event | None = None) -> None:
        self.listener = AsyncListener(media, reconnecting_interval=0.3)
        self.seen: list[tuple[Any, ...]] = []
        self.changes: list[ContactChange] = []
        self.calls: Counter[str] = Counter()
        self.hold = hold  # an async change callback waits on it: the change stays unacked
        self.listener.on_screen_pop(self._pop)
        self.listener.on_contact_changed(self._change)

    def _pop(self, event: Any) -> None:
        self.calls[event.id] += 1
        self.seen.append(("pop", event.resource))

    async def _change(self, change: ContactChange) -> None:
        self.calls[change.id] += 1
        self.changes.append(change)
        self.seen.append((change.change, change.resource, _detail(change.to_dict())))
        if self.hold is not None:
            await self.hold.wait()

    async def up(self, address: str, resource: str) -> Follower:
        await self.listener.initialize(address)
        await self.listener.start_listening(resource)
        return self

    async def down(self) -> None:
        if self.listener.status is not ListenerStatus.Status_Down:
            await self.listener.shutdown()


DETAIL = ("answered_by", "transferred_to", "consulted", "talk_time", "wait_time", "reason")


def _detail(body: dict[str, Any]) -> dict[str, Any]:
    """The fields that vary by change, those set only (strings non-empty)."""
    return {k: body[k] for k in DETAIL if body[k] != ""}


async def quiet(hub: Any) -> None:
    """Everything delivered and acked: pops and changes."""
    assert await until(lambda: not hub.delivery.pending, 10), hub.status()["counters"]


def played(name: str) -> list[dict[str, Any]]:
    """A builtin scenario's events, then its contact's `ended` 30 s after the last one."""
    events = timeline(load_scenario(name), START)
    last = datetime.fromisoformat(events[-1]["at"].replace("Z", "+00:00"))
    end = (last + timedelta(seconds=30)).isoformat()
    return [*events, {"contact_id": events[0]["contact_id"], "event": "ended", "at": end}]


# What each listener of each builtin scenario sees, in order, when the scenario is played event
# by event (each acked before the next) and its contact ends 30 s after the last event.
EXPECTED: dict[str, dict[str, list[tuple[Any, ...]]]] = {
    "routed-call": {
        "13579": [
            ("pop", "13579"),
            ("answered", "13579", {"answered_by": "13579", "talk_time": 0, "wait_time": 15}),
            ("ended", "13579", {"talk_time": 30, "wait_time": 15}),
        ]
    },
    "consultation": {
        "13579": [
            ("pop", "13579"),
            ("answered", "13579", {"answered_by": "13579", "talk_time": 0, "wait_time": 15}),
            ("consulted", "13579", {"consulted": "54321", "talk_time": 0, "wait_time": 15}),
            ("ended", "13579", {"talk_time": 50, "wait_time": 15}),
        ],
        "54321": [("pop", "54321"), ("ended", "54321", {"talk_time": 50, "wait_time": 15})],
    },
    "requeue": {
        "13579": [
            ("pop", "13579"),
            ("answered", "13579", {"answered_by": "13579", "talk_time": 0, "wait_time": 15}),
            (
                "requeued",
                "13579",
                {"talk_time": 0, "wait_time": 0, "reason": "File d'attente Service"},
            ),
        ],
        "1111": [
            ("pop", "1111"),
            ("ended", "1111", {"talk_time": 0, "wait_time": 35, "reason": "abandoned"}),
        ],
    },
    "direct-call": {
        "13579": [
            ("pop", "13579"),
            ("answered", "13579", {"answered_by": "13579", "talk_time": 0, "wait_time": 0}),
            ("ended", "13579", {"talk_time": 30, "wait_time": 0}),
        ]
    },
    "conference": {
        "13579": [
            ("pop", "13579"),
            ("answered", "13579", {"answered_by": "13579", "talk_time": 0, "wait_time": 12}),
            (
                "conferenced",
                "13579",
                {"talk_time": 0, "wait_time": 12, "reason": "joined by 24680"},
            ),
            ("ended", "13579", {"talk_time": 90, "wait_time": 12}),
        ],
        "24680": [("pop", "24680"), ("ended", "24680", {"talk_time": 90, "wait_time": 12})],
    },
    "ivr-handover": {
        "13579": [("pop", "13579"), ("ended", "13579", {"talk_time": 75, "wait_time": 1})]
    },
    "recall": {
        "13579": [
            ("pop", "13579"),
            ("answered", "13579", {"answered_by": "13579", "talk_time": 0, "wait_time": 9}),
            ("transferred", "13579", {"transferred_to": "54321", "talk_time": 0, "wait_time": 9}),
            ("pop", "13579"),
            ("ended", "13579", {"talk_time": 80, "wait_time": 9}),
        ],
        "54321": [
            ("pop", "54321"),
            (
                "transferred",
                "54321",
                {"transferred_to": "13579", "talk_time": 0, "wait_time": 9, "reason": "recalled"},
            ),
        ],
    },
    "pickup": {
        "13579": [
            ("pop", "13579"),
            (
                "answered",
                "13579",
                {"answered_by": "24680", "talk_time": 0, "wait_time": 20, "reason": "picked up"},
            ),
        ],
        "24680": [
            ("pop", "24680"),
            ("answered", "24680", {"answered_by": "24680", "talk_time": 0, "wait_time": 21}),
            ("ended", "24680", {"talk_time": 30, "wait_time": 21}),
        ],
    },
    "transfer": {
        "13579": [
            ("pop", "13579"),
            ("answered", "13579", {"answered_by": "13579", "talk_time": 0, "wait_time": 9}),
            ("transferred", "13579", {"transferred_to": "54321", "talk_time": 0, "wait_time": 9}),
        ],
        "54321": [("pop", "54321"), ("ended", "54321", {"talk_time": 70, "wait_time": 9})],
    },
    "forwarded-call": {
        "13579": [
            ("pop", "13579"),
            (
                "transferred",
                "13579",
                {
                    "transferred_to": "24680",
                    "talk_time": 0,
                    "wait_time": 25,
                    "reason": "redirected",
                },
            ),
        ],
        "24680": [
            ("pop", "24680"),
            ("ended", "24680", {"talk_time": 0, "wait_time": 55, "reason": "abandoned"}),
        ],
    },
    "callback-routed": {
        "jdupont": [
            ("pop", "jdupont"),
            ("ended", "jdupont", {"talk_time": 0, "wait_time": 120, "reason": "abandoned"}),
        ]
    },
    "email-routed": {
        "mmartin": [
            ("pop", "mmartin"),
            ("ended", "mmartin", {"talk_time": 0, "wait_time": 330, "reason": "abandoned"}),
        ]
    },
    "email-requeued": {
        "mmartin": [
            ("pop", "mmartin"),
            ("answered", "mmartin", {"answered_by": "mmartin", "talk_time": 0, "wait_time": 130}),
            ("requeued", "mmartin", {"talk_time": 0, "wait_time": 0, "reason": "Email service"}),
        ],
        "jdurand": [
            ("pop", "jdurand"),
            ("ended", "jdurand", {"talk_time": 0, "wait_time": 230, "reason": "abandoned"}),
        ],
    },
    "email-transferred": {
        "mmartin": [
            ("pop", "mmartin"),
            ("answered", "mmartin", {"answered_by": "mmartin", "talk_time": 0, "wait_time": 65}),
            (
                "transferred",
                "mmartin",
                {"transferred_to": "jdurand", "talk_time": 0, "wait_time": 65},
            ),
        ],
        "jdurand": [("pop", "jdurand"), ("ended", "jdurand", {"talk_time": 150, "wait_time": 65})],
    },
    "email-deferred-resumed": {
        "mmartin": [
            ("pop", "mmartin"),
            ("answered", "mmartin", {"answered_by": "mmartin", "talk_time": 0, "wait_time": 35}),
            ("pop", "mmartin"),
            ("ended", "mmartin", {"talk_time": 3630, "wait_time": 35}),
        ]
    },
    "webcollab-routed": {
        "lbernard": [
            ("pop", "lbernard"),
            ("ended", "lbernard", {"talk_time": 0, "wait_time": 50, "reason": "abandoned"}),
        ]
    },
    "webcollab-invitation": {
        "lbernard": [
            ("pop", "lbernard"),
            ("answered", "lbernard", {"answered_by": "lbernard", "talk_time": 0, "wait_time": 18}),
            (
                "conferenced",
                "lbernard",
                {"talk_time": 0, "wait_time": 18, "reason": "invited pmoreau"},
            ),
            ("ended", "lbernard", {"talk_time": 90, "wait_time": 18}),
        ],
        "pmoreau": [("pop", "pmoreau"), ("ended", "pmoreau", {"talk_time": 90, "wait_time": 18})],
    },
    "webcollab-requeue-transfer": {
        "lbernard": [
            ("pop", "lbernard"),
            ("answered", "lbernard", {"answered_by": "lbernard", "talk_time": 0, "wait_time": 17}),
            ("requeued", "lbernard", {"talk_time": 0, "wait_time": 0, "reason": "Web support"}),
        ],
        "pmoreau": [
            ("pop", "pmoreau"),
            ("ended", "pmoreau", {"talk_time": 0, "wait_time": 55, "reason": "abandoned"}),
        ],
    },
}


def test_every_builtin_scenario_has_its_updates():
    assert sorted(EXPECTED) == builtin_names()


@pytest.mark.parametrize("journal", [False, True], ids=["memory", "journal"])
@pytest.mark.parametrize("name", builtin_names())
def test_scenario_updates_reach_each_listener_in_order(name: str, journal: bool, tmp_path) -> None:
    """Played through a real hub to real listeners, one event at a time, each acked."""
    media = load_scenario(name).expect[0]["media"]

    async def body() -> None:
        async with inprocess_hub(**_journal(journal, tmp_path)) as hub:
            followers = {r: await Follower(media).up(address_of(hub), r) for r in EXPECTED[name]}
            try:
                for event in played(name):
                    await hub.apply_contacts(event)
                    await quiet(hub)
                assert {r: f.seen for r, f in followers.items()} == EXPECTED[name]
                changes = [c for f in followers.values() for c in f.changes]
                assert all(c.contact_id == played(name)[0]["contact_id"] for c in changes)
                assert all(n == 1 for f in followers.values() for n in f.calls.values())
            finally:
                for follower in followers.values():
                    await follower.down()

    run(body())


def test_tracker_makes_the_same_updates_as_the_hub():
    """The pure rules (ContactTracker) give what the hub delivers, in the order it is made."""
    for name, expected in EXPECTED.items():
        made: dict[str, list[tuple[Any, ...]]] = {r: [] for r in expected}
        for outcome in ContactTracker().apply_batch(played(name), START):
            for change in outcome.changes:
                made[change.resource].append(("change", change.change))
            for pop in outcome.pops:
                made[pop.resource].append(("pop",))
        want = {
            r: [("pop",) if s[0] == "pop" else ("change", s[0]) for s in seen]
            for r, seen in expected.items()
        }
        assert made == want, name


# -- ringall ---------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", runners())
def test_ringall_three_listeners_two_learn_it_went_elsewhere(runner: Any) -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            agents = {r: await Follower().up(address_of(hub), r) for r in ("1001", "1002", "1003")}
            try:
                start = {"contact_id": "ring", "event": "queued", "at": "2024-05-14T09:00:00Z"}
                await hub.apply_contacts(start)
                for resource in agents:
                    await hub.apply_contacts(
                        {
                            "contact_id": "ring",
                            "event": "routed",
                            "resource": resource,
                            "at": "2024-05-14T09:00:04Z",
                        }
                    )
                await quiet(hub)
                await hub.apply_contacts(
                    {
                        "contact_id": "ring",
                        "event": "answered",
                        "resource": "1002",
                        "at": "2024-05-14T09:00:07Z",
                    }
                )
                await hub.apply_contacts(
                    {"contact_id": "ring", "event": "ended", "at": "2024-05-14T09:01:07Z"}
                )
                await quiet(hub)
                elsewhere = {
                    "answered_by": "1002",
                    "talk_time": 0,
                    "wait_time": 7,
                    "reason": "answered elsewhere",
                }
                assert agents["1001"].seen == [("pop", "1001"), ("answered", "1001", elsewhere)]
                assert agents["1003"].seen == [("pop", "1003"), ("answered", "1003", elsewhere)]
                assert agents["1002"].seen == [
                    ("pop", "1002"),
                    ("answered", "1002", {"answered_by": "1002", "talk_time": 0, "wait_time": 7}),
                    ("ended", "1002", {"talk_time": 60, "wait_time": 7}),
                ]
            finally:
                for agent in agents.values():
                    await agent.down()

    runner(asyncio.wait_for(body(), 60))


@pytest.mark.parametrize("journal", [False, True], ids=["memory", "journal"])
def test_ringall_unacked_pop_is_withdrawn_and_never_delivered(journal: bool, tmp_path) -> None:
    """An agent offline while its pop rang: answered elsewhere takes the pop back; when it
    comes, it gets `withdrawn` (no pop for a call someone else has)."""

    async def body() -> None:
        async with inprocess_hub(**_journal(journal, tmp_path)) as hub:
            here = await Follower().up(address_of(hub), "1001")
            try:
                for resource in ("1001", "1002"):
                    await hub.apply_contacts(
                        {
                            "contact_id": "ring",
                            "event": "routed",
                            "resource": resource,
                            "at": "2024-05-14T09:00:00Z",
                        }
                    )
                pending = hub.delivery.pending
                assert await until(lambda: [p.key[1] for p in pending.values()] == ["1002"])
                await hub.apply_contacts(
                    {
                        "contact_id": "ring",
                        "event": "answered",
                        "resource": "1001",
                        "at": "2024-05-14T09:00:05Z",
                    }
                )
                assert hub.status()["pending"] == 0  # 1002's pop was taken back
                assert hub.status()["counters"]["withdrawn"] == 1
                late = await Follower().up(address_of(hub), "1002")
                await quiet(hub)
                assert late.seen == ANSWERED_ELSEWHERE
                await late.down()
            finally:
                await here.down()

    run(body())


@pytest.mark.parametrize("journal", [False, True], ids=["memory", "journal"])
def test_ended_withdraws_an_unacked_pop_as_withdrawn(journal: bool, tmp_path) -> None:
    async def body() -> None:
        async with inprocess_hub(**_journal(journal, tmp_path)) as hub:
            await hub.apply_contacts(
                [
                    {
                        "contact_id": "c",
                        "event": "routed",
                        "resource": "1001",
                        "at": "2024-05-14T09:00:00Z",
                    },
                    {"contact_id": "c", "event": "ended", "at": "2024-05-14T09:00:09Z"},
                ]
            )
            late = await Follower().up(address_of(hub), "1001")
            try:
                await quiet(hub)
                assert late.seen == [
                    ("withdrawn", "1001", {"talk_time": 0, "wait_time": 0, "reason": "ended"})
                ]
            finally:
                await late.down()

    run(body())


# -- reconnects and restarts -----------------------------------------------------------------


@pytest.mark.parametrize("runner", runners())
def test_disconnected_listener_gets_missed_updates_exactly_once(runner: Any) -> None:
    """Between pop and end the connection drops twice: once with `answered` delivered and not
    acked (its callback still running), once while `consulted` and `ended` happen."""

    async def body() -> None:
        async with inprocess_hub() as hub:
            hold = asyncio.Event()
            agent = await Follower(hold=hold).up(address_of(hub), "1001")
            try:

                def cut() -> None:
                    for conn in list(hub.connections):
                        if conn.transport is not None:
                            conn.transport.abort()

                def event(kind: str, second: int, **fields: Any) -> dict[str, Any]:
                    return {
                        "contact_id": "c",
                        "event": kind,
                        "at": f"2024-05-14T09:00:{second:02d}Z",
                        **fields,
                    }

                await hub.apply_contacts([event("queued", 0), event("routed", 2, resource="1001")])
                await quiet(hub)
                await hub.apply_contacts(event("answered", 5, resource="1001"))
                assert await until(lambda: len(agent.changes) == 1)
                cut()  # answered delivered, its callback still holding the ack
                old = set(hub.connections)
                assert await until(lambda: not old & hub.connections)
                await hub.apply_contacts(event("consulted", 20, resource="2002"))
                await hub.apply_contacts(event("ended", 50))
                hold.set()
                assert await until(
                    lambda: (
                        agent.listener.status is ListenerStatus.Status_Up
                        and [p.key[1] for p in hub.delivery.pending.values()] == ["2002"]
                    )
                )  # 2002 (consulted, no listener) keeps its `withdrawn` for when it comes
                # answered went out twice (before the cut, unacked, and in the replay); the
                # listener ran its callback once and acked the replayed copy
                assert hub.status()["counters"]["changes_delivered"] == 4
                assert [s[0] for s in agent.seen] == ["pop", "answered", "consulted", "ended"]
                assert all(n == 1 for n in agent.calls.values()), agent.calls
            finally:
                await agent.down()

    runner(asyncio.wait_for(body(), 60))


def test_hub_killed_between_pop_and_end_updates_keep_coming(tmp_path):
    """SIGKILL after the pop and after a journalled `answered` nobody received yet: after the
    restart the listener gets `answered` (from the journal), then `ended`."""
    hub = HubProcess(tmp_path / "hub").start()

    def post(event: dict[str, Any]) -> None:
        status, answer = http_post(hub.http + "/v1/contacts", event)
        assert status == 200, answer

    async def body() -> None:
        agent = await Follower().up(hub.address, "1001")
        await asyncio.to_thread(
            post,
            {
                "contact_id": "k",
                "event": "routed",
                "resource": "1001",
                "at": "2024-05-14T09:00:00Z",
            },
        )
        assert await until(lambda: agent.seen == [("pop", "1001")])
        async with asyncio.timeout(10):  # its ack reaches the hub
            while (await client.fetch_status_async(hub.address))["pending"]:
                await asyncio.sleep(0.01)
        await agent.down()
        await asyncio.to_thread(
            post,
            {
                "contact_id": "k",
                "event": "answered",
                "resource": "1001",
                "at": "2024-05-14T09:00:03Z",
            },
        )
        await asyncio.to_thread(hub.restart)
        again = await Follower().up(hub.address, "1001")
        try:
            assert await until(lambda: len(again.seen) == 1, 10)
            await asyncio.to_thread(
                post, {"contact_id": "k", "event": "ended", "at": "2024-05-14T09:00:33Z"}
            )
            assert await until(lambda: len(again.seen) == 2, 10)
            assert again.seen == [
                ("answered", "1001", {"answered_by": "1001", "talk_time": 0, "wait_time": 0}),
                ("ended", "1001", {"talk_time": 30, "wait_time": 0}),
            ]
        finally:
            await again.down()

    try:
        run(body())
    finally:
        hub.kill()


@pytest.mark.parametrize("journal", [False, True], ids=["memory", "journal"])
def test_retried_event_makes_its_updates_once(journal: bool, tmp_path) -> None:
    async def body() -> None:
        async with inprocess_hub(**_journal(journal, tmp_path)) as hub:
            agent = await Follower().up(address_of(hub), "1001")
            try:
                await hub.apply_contacts(
                    {"contact_id": "c", "event": "routed", "resource": "1001", "id": "e1"}
                )
                answered = {"contact_id": "c", "event": "answered", "resource": "1001", "id": "e2"}
                await hub.apply_contacts(answered)
                await hub.apply_contacts(answered)
                await quiet(hub)
                assert [s[0] for s in agent.seen] == ["pop", "answered"]
                assert agent.changes[0].id.startswith("sha256:")
            finally:
                await agent.down()

    run(body())


# -- the wire: protocol 1 unchanged, protocol 2 opt-in -------------------------------------------


async def _raw_listener(hub: Any, **hello: Any) -> tuple[RawClient, dict[str, Any]]:
    raw = await RawClient.open(hub.port)
    await raw.send({"op": "hello", "ref": 0, **hello})
    welcome = await raw.frame()
    assert welcome is not None
    answer = await raw.request("register", media="telephone", resource="1001")
    assert answer["op"] == "ok"
    return raw, welcome


async def _play_call(hub: Any) -> None:
    await hub.apply_contacts(
        {"contact_id": "c", "event": "routed", "resource": "1001", "at": "2024-05-14T09:00:00Z"}
    )


async def _finish_call(hub: Any) -> None:
    await hub.apply_contacts(
        {"contact_id": "c", "event": "answered", "resource": "1001", "at": "2024-05-14T09:00:02Z"}
    )
    await hub.apply_contacts({"contact_id": "c", "event": "ended", "at": "2024-05-14T09:00:12Z"})


@pytest.mark.parametrize(
    "hello",
    [
        {"version": 1},
        {"version": 1, "updates": True},
        {"version": 2},
        {"version": 2, "updates": False},
    ],
)
def test_client_without_updates_sees_exactly_what_it_saw_before(hello: dict[str, Any]) -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            raw, welcome = await _raw_listener(hub, **hello)
            expected_welcome = {
                "op": "welcome",
                "version": hello["version"],
                "server": "spop",
                "heartbeat": 1,
                "max_frame": 65536,
                "pop_ttl": 120,
                "max_registrations": 10000,
                "ref": 0,
            }
            if hello["version"] == 2:
                expected_welcome["updates"] = False
            assert welcome == expected_welcome
            await _play_call(hub)
            pop = await raw.frame()
            assert pop is not None and pop["op"] == "pop"
            await raw.send({"op": "ack", "ids": [pop["pop"]["id"]]})
            assert await until(lambda: hub.status()["pending"] == 0)
            await _finish_call(hub)
            with pytest.raises(TimeoutError):
                await raw.frame(timeout=0.5)  # nothing but pings
            status = hub.status()
            assert status["pending"] == 0
            assert status["counters"]["changes_pending"] == 2  # kept for a listener that asks
            assert status["counters"]["changes_delivered"] == 0
            raw.close()

    run(body())


def test_protocol_2_client_with_updates_gets_change_frames_and_acks_them():
    async def body() -> None:
        async with inprocess_hub() as hub:
            raw, welcome = await _raw_listener(hub, version=2, updates=True)
            assert welcome["version"] == 2 and welcome["updates"] is True
            await _play_call(hub)
            pop = await raw.frame()
            assert pop is not None
            await raw.send({"op": "ack", "ids": [pop["pop"]["id"]]})
            assert await until(lambda: hub.status()["pending"] == 0)
            await _finish_call(hub)
            frames = [await raw.frame(), await raw.frame()]
            bodies = [f["change"] for f in frames if f is not None]
            assert [f["op"] for f in frames if f is not None] == ["change", "change"]
            ids = [body_.pop("id") for body_ in bodies]
            assert all(isinstance(i, str) for i in ids) and len(set(ids)) == 2
            common = {
                "contact_id": "c",
                "media": "telephone",
                "resource": "1001",
                "pop_id": pop["pop"]["id"],
                "transferred_to": "",
                "consulted": "",
            }
            assert bodies == [
                {
                    **common,
                    "change": "answered",
                    "at": "2024-05-14T09:00:02.000Z",
                    "answered_by": "1001",
                    "talk_time": 0,
                    "wait_time": 0,
                    "reason": "",
                },
                {
                    **common,
                    "change": "ended",
                    "at": "2024-05-14T09:00:12.000Z",
                    "answered_by": "",
                    "talk_time": 10,
                    "wait_time": 0,
                    "reason": "",
                },
            ]
            await raw.send({"op": "ack", "ids": ids})
            assert await until(lambda: hub.status()["counters"]["changes_pending"] == 0)
            assert hub.status()["counters"]["changes_acked"] == 2
            raw.close()

    run(body())


def test_listener_without_change_callback_speaks_protocol_1():
    async def body() -> None:
        async with inprocess_hub() as hub:
            listener = AsyncListener("telephone")
            await listener.initialize(address_of(hub))
            await listener.start_listening("1001")
            try:
                assert [c.updates for c in hub.connections] == [False]
            finally:
                await listener.shutdown()

    run(body())


def test_listener_with_change_callback_falls_back_to_protocol_1_on_an_older_hub():
    """A hub that speaks only version 1 refuses the version-2 hello: the listener connects again
    with version 1, and gets its pops (no updates)."""
    hellos: list[dict[str, Any]] = []

    async def old_hub(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import orjson

        while line := await reader.readline():
            frame = orjson.loads(line)
            if frame["op"] == "hello":
                hellos.append(frame)
                if frame["version"] != 1:
                    error = {
                        "op": "error",
                        "code": "SCREENPOP_Initialization_Error",
                        "ref": frame["ref"],
                        "fatal": True,
                        "message": f"protocol version {frame['version']} not supported (hub speaks 1)",
                    }
                    writer.write(orjson.dumps(error) + b"\n")
                    writer.close()
                    return
                writer.write(
                    orjson.dumps({"op": "welcome", "version": 1, "ref": frame["ref"]}) + b"\n"
                )
            elif "ref" in frame:
                writer.write(orjson.dumps({"op": "ok", "ref": frame["ref"]}) + b"\n")
        writer.close()

    async def body() -> None:
        server = await asyncio.start_server(old_hub, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        agent = Follower()
        try:
            await agent.up(f"{port}@127.0.0.1", "1001")
            assert agent.listener.status is ListenerStatus.Status_Up
            assert [(h["version"], h.get("updates")) for h in hellos] == [(2, True), (1, None)]
        finally:
            await agent.down()
            server.close()

    run(body())
