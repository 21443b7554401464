"""Actions per trigger (`on`), combined with `when`; change fields in templates; the hook;
`spop listen --json` change lines. Real hub, real listeners, real files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hubproc import address_of, inprocess_hub, run, until
from spop_cli.actions import DEFAULT_ON, ActionConfigError, configure_action
from spop_cli.config import check_config
from spop_cli.hookspecs import hookimpl
from spop_cli.plugins import action_types, build_plugin_manager
from spop_cli.session import ListenerPlan, ListenSession

TYPES = action_types(build_plugin_manager(entry_points=False))


def test_old_table_without_on_runs_on_pops_only():
    configured = configure_action(TYPES, "log", {"plugin": "json", "path": "-"})
    assert configured.on == DEFAULT_ON == frozenset({"pop"})


@pytest.mark.parametrize(
    ("on", "message"),
    [
        ([], "must be a non-empty list of triggers"),
        ("hangup", "unknown trigger 'hangup'"),
        (["pop", "answerd"], "unknown trigger 'answerd'"),
        ([1], "must be a non-empty list of triggers"),
    ],
)
def test_bad_on_is_refused_naming_the_key(on: Any, message: str) -> None:
    with pytest.raises(ActionConfigError) as caught:
        configure_action(TYPES, "log", {"plugin": "json", "path": "-", "on": on})
    assert caught.value.key == "on" and message in caught.value.message
    problems = check_config({"actions": {"log": {"plugin": "json", "path": "-", "on": on}}}, TYPES)
    assert [p.path for p in problems] == ["actions.log.on"]


def test_every_trigger_is_accepted():
    triggers = [
        "pop",
        "answered",
        "consulted",
        "transferred",
        "conferenced",
        "requeued",
        "withdrawn",
        "ended",
    ]
    assert configure_action(
        TYPES, "log", {"plugin": "json", "path": "-", "on": triggers}
    ).on == set(triggers)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_actions_on_and_when_combined(tmp_path: Path) -> None:
    """`on = ["ended"]` with `when` on the pop's queue: runs for the ended sales call only;
    an old table (no `on`) still runs on every pop and on no change."""
    tables = {
        "wrapup": {
            "plugin": "json",
            "path": str(tmp_path / "wrapup.jsonl"),
            "on": ["ended"],
            "when": {"queue_name": "Ventes*"},
        },
        "both": {"plugin": "json", "path": str(tmp_path / "both.jsonl"), "on": ["pop", "answered"]},
        "old": {"plugin": "json", "path": str(tmp_path / "old.jsonl")},
    }
    actions = [configure_action(TYPES, name, table) for name, table in tables.items()]

    async def body() -> None:
        async with inprocess_hub() as hub:
            session = ListenSession(
                [ListenerPlan("telephone", "1001", actions)], address=address_of(hub)
            )
            await session.start()
            try:
                for contact, queue in (("sales", "Ventes"), ("service", "Service")):
                    for kind, second, extra in (
                        ("queued", 0, {"queue_name": queue}),
                        ("routed", 5, {"resource": "1001"}),
                        ("answered", 7, {"resource": "1001"}),
                        ("ended", 67, {}),
                    ):
                        await hub.apply_contacts(
                            {
                                "contact_id": contact,
                                "event": kind,
                                "at": f"2024-05-14T09:{second // 60:02d}:{second % 60:02d}Z",
                                **extra,
                            }
                        )
                        assert await until(lambda: not hub.delivery.pending)
                assert await session.entries[0].dispatcher.drain(10)
            finally:
                await session.finish(5)
        wrapup = _lines(tmp_path / "wrapup.jsonl")
        assert [
            (r["contact_id"], r["change"], r["talk_time"], r["queue_name"]) for r in wrapup
        ] == [("sales", "ended", 60, "Ventes")]
        both = _lines(tmp_path / "both.jsonl")
        assert [(r["contact_id"], r.get("change", "pop")) for r in both] == [
            ("sales", "pop"),
            ("sales", "answered"),
            ("service", "pop"),
            ("service", "answered"),
        ]
        old = _lines(tmp_path / "old.jsonl")
        assert [(r["contact_id"], "change" in r) for r in old] == [
            ("sales", False),
            ("service", False),
        ]

    run(body())


def test_change_templates_render_change_and_pop_fields(tmp_path: Path) -> None:
    out = tmp_path / "args.txt"
    script = tmp_path / "record.py"
    script.write_text("import sys\nopen(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + '\\n')\n")
    import sys

    action = configure_action(
        TYPES,
        "script",
        {
            "plugin": "command",
            "argv": [
                sys.executable,
                str(script),
                str(out),
                "{change}",
                "{answered_by}",
                "{source}",
                "{talk_time}",
                "{transferred_to}",
            ],
            "on": ["answered", "transferred"],
        },
    )

    async def body() -> None:
        async with inprocess_hub() as hub:
            session = ListenSession(
                [ListenerPlan("telephone", "1001", [action])], address=address_of(hub)
            )
            await session.start()
            try:
                for event in (
                    {
                        "event": "routed",
                        "resource": "1001",
                        "source": "0612",
                        "at": "2024-05-14T09:00:00Z",
                    },
                    {"event": "answered", "resource": "1001", "at": "2024-05-14T09:00:03Z"},
                    {"event": "transferred", "resource": "2002", "at": "2024-05-14T09:00:30Z"},
                ):
                    await hub.apply_contacts({"contact_id": "t", **event})
                    assert await until(
                        lambda: not [p for p in hub.delivery.pending.values() if p.key[1] == "1001"]
                    )
                assert await session.entries[0].dispatcher.drain(20)
            finally:
                await session.finish(5)
        assert out.read_text().splitlines() == ["answered 1001 0612 0 ", "transferred  0612 0 2002"]

    run(body())


def test_listen_json_writes_one_line_per_change():
    from spop_cli.actions.json import change_line
    from spop_cli.model import ContactChange

    change = ContactChange.from_dict(
        {
            "id": "x",
            "contact_id": "c",
            "media": "telephone",
            "resource": "1",
            "pop_id": "p",
            "change": "ended",
            "at": "t",
            "talk_time": 5,
        }
    )
    record = json.loads(change_line(change, received_at="r"))
    assert list(record)[0] == "type" and record == {
        "type": "change",
        **change.to_dict(),
        "received_at": "r",
    }


class Follows:
    """A plugin with no action: it implements the spop_contact_changed hook."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Any]] = []

    @hookimpl
    def spop_contact_changed(self, change: Any, listener: Any) -> None:
        self.seen.append((change.change, change.answered_by, listener.resource))


def test_plugin_hook_sees_each_change_with_its_listener() -> None:
    pm = build_plugin_manager(entry_points=False)
    plugin = Follows()
    pm.add_plugin(plugin, "follows", "test")

    async def body() -> None:
        async with inprocess_hub() as hub:
            session = ListenSession(
                [ListenerPlan("telephone", "1001", [])], address=address_of(hub), plugin_manager=pm
            )
            await session.start()
            try:
                await hub.apply_contacts({"contact_id": "h", "event": "routed", "resource": "1001"})
                assert await until(lambda: not hub.delivery.pending)
                await hub.apply_contacts(
                    [
                        {"contact_id": "h", "event": "answered", "resource": "1001"},
                        {"contact_id": "h", "event": "ended"},
                    ]
                )
                assert await until(lambda: not hub.delivery.pending)
                assert await session.entries[0].dispatcher.drain(10)
            finally:
                await session.finish(5)

    run(body())
    assert plugin.seen == [("answered", "1001", "1001"), ("ended", "", "1001")]


def test_the_live_views_cards_follow_pops_outcomes_and_changes(tmp_path: Path) -> None:
    """The session keeps the last pops for the live view; a card is made when it is first
    wanted (an outcome, a change, a snapshot), and shows the same whichever came first."""
    from spop_cli.dispatch import OK
    from spop_cli.session import RECENT_POPS

    actions = [
        configure_action(TYPES, "log", {"plugin": "json", "path": str(tmp_path / "p.jsonl")})
    ]

    async def body() -> None:
        async with inprocess_hub() as hub:
            session = ListenSession(
                [ListenerPlan("telephone", "1001", actions)], address=address_of(hub)
            )
            await session.start()
            try:
                # a tracked call: a pop (routed), then answered here
                for kind, second, extra in (
                    ("queued", 0, {"queue_name": "Ventes", "source": "12345"}),
                    ("routed", 5, {"resource": "1001"}),
                    ("answered", 7, {"resource": "1001"}),
                ):
                    await hub.apply_contacts(
                        {
                            "contact_id": "call-1",
                            "event": kind,
                            "at": f"2024-05-14T09:00:{second:02d}Z",
                            **extra,
                        }
                    )
                    assert await until(lambda: not hub.delivery.pending)
                await hub.publish(
                    [
                        {"id": f"p-{i}", "media": "telephone", "resource": "1001", "source": str(i),
                         "contact_data": {"k": f"v{i}"}}
                        for i in range(RECENT_POPS)
                    ]
                )  # fmt: skip
                assert await until(lambda: session.received == RECENT_POPS + 1)
                assert await session.entries[0].dispatcher.drain(10)
                cards = session.snapshot().pops
            finally:
                await session.finish(5)
        # newest first, only the last RECENT_POPS: the tracked call's card has gone
        assert [c.pop_id for c in cards] == [f"p-{i}" for i in reversed(range(RECENT_POPS))]
        newest = cards[0]
        assert (newest.source, newest.contact_data, newest.state) == (
            str(RECENT_POPS - 1),
            (("k", f"v{RECENT_POPS - 1}"),),
            "",
        )
        assert {c.outcomes["log"].status for c in cards} == {OK}

    run(body())


def test_a_card_made_by_an_outcome_then_moved_by_a_change(tmp_path: Path) -> None:
    from spop_cli.dispatch import OK

    actions = [
        configure_action(TYPES, "log", {"plugin": "json", "path": str(tmp_path / "p.jsonl")})
    ]

    async def body() -> None:
        async with inprocess_hub() as hub:
            session = ListenSession(
                [ListenerPlan("telephone", "1001", actions)], address=address_of(hub)
            )
            await session.start()
            try:
                for kind, second, extra in (
                    ("queued", 0, {"queue_name": "Ventes", "source": "12345"}),
                    ("routed", 5, {"resource": "1001"}),
                ):
                    await hub.apply_contacts(
                        {
                            "contact_id": "call-1",
                            "event": kind,
                            "at": f"2024-05-14T09:00:{second:02d}Z",
                            **extra,
                        }
                    )
                    assert await until(lambda: not hub.delivery.pending)
                assert await until(lambda: session.received == 1)
                assert await session.entries[0].dispatcher.drain(10)
                (ringing,) = session.snapshot().pops
                await hub.apply_contacts(
                    {
                        "contact_id": "call-1",
                        "event": "answered",
                        "at": "2024-05-14T09:00:07Z",
                        "resource": "1001",
                    }
                )
                assert await until(lambda: session.changes == 1)
                (talking,) = session.snapshot().pops
            finally:
                await session.finish(5)
        assert (ringing.state, ringing.source, ringing.queue, ringing.outcomes["log"].status) == (
            "ringing",
            "12345",
            "Ventes",
            OK,
        )
        assert (talking.pop_id, talking.state, talking.outcomes["log"].status) == (
            ringing.pop_id,
            "talking",
            OK,
        )
        assert talking.talk_since is not None

    run(body())


def test_a_listener_keeps_a_pop_only_while_it_follows_its_contact():
    """A pop no change will name (no contact; a contact answered elsewhere, transferred, ended)
    is let go: 1,000 listeners keeping every pop filled the process and its full GC passes."""

    async def body() -> None:
        async with inprocess_hub() as hub:
            session = ListenSession(
                [ListenerPlan("telephone", "1001"), ListenerPlan("telephone", "1002")],
                address=address_of(hub),
            )
            await session.start()
            one, two = session.entries

            def kept() -> tuple[list[str], list[str]]:
                return [p.contact_id for p in one.pops.values()], [
                    p.contact_id for p in two.pops.values()
                ]

            async def settle(changes: int) -> None:
                assert await until(lambda: session.changes == changes and not hub.delivery.pending)

            try:
                await hub.publish({"media": "telephone", "resource": "1001", "source": "x"})
                assert await until(lambda: session.received == 1)
                assert kept() == ([], [])  # no contact: never followed
                for resource in ("1001", "1002"):  # ringall
                    await hub.apply_contacts(
                        {"contact_id": "r", "event": "routed", "resource": resource}
                    )
                assert await until(lambda: session.received == 3)
                assert kept() == (["r"], ["r"])
                await hub.apply_contacts(
                    {"contact_id": "r", "event": "answered", "resource": "1001"}
                )
                await settle(2)
                assert kept() == (["r"], [])  # 1002: answered elsewhere, no longer following
                await hub.apply_contacts(
                    {"contact_id": "r", "event": "consulted", "resource": "1002"}
                )
                assert await until(lambda: session.received == 4)  # 1002 popped as consulted
                await settle(3)
                assert kept() == (["r"], ["r"])
                await hub.apply_contacts({"contact_id": "r", "event": "ended"})
                await settle(5)
                assert kept() == ([], [])
            finally:
                await session.finish(5)

    run(body())


@pytest.mark.parametrize("answered", [False, True])
def test_a_pop_of_the_same_contact_again_replaces_the_earlier_card(
    tmp_path: Path, answered: bool
) -> None:
    """Scenario D of the Asterisk recording: queued, rung at 101 (no answer), rung at 101 again
    (`recalled`: a second pop to the same listener), then the caller hangs up. The hub's changes
    name the last pop 101 got, so the first card stops following: `popped again`, never left
    `ringing` (or `talking`, its clock running) for good after the hang-up."""
    from time import localtime, strftime

    wrapup = configure_action(
        TYPES, "wrapup", {"plugin": "json", "path": str(tmp_path / "w.jsonl"), "on": ["ended"]}
    )

    async def body() -> None:
        async with inprocess_hub() as hub:
            session = ListenSession(
                [ListenerPlan("telephone", "101", [wrapup])], address=address_of(hub)
            )
            await session.start()
            entry = session.entries[0]

            async def apply(second: int, event: dict[str, Any]) -> None:
                at = f"2024-05-14T09:00:{second:02d}Z"
                await hub.apply_contacts({"contact_id": "frank", "at": at, **event})
                assert await until(lambda: not hub.delivery.pending)

            try:
                await apply(0, {"event": "queued", "source": "+15550100",
                                "queue_name": "nightshift", "contact_data": {"k": "v1"}})  # fmt: skip
                await apply(1, {"event": "routed", "resource": "101"})
                if answered:
                    await apply(3, {"event": "answered", "resource": "101"})
                    assert await until(lambda: session.changes == 1)
                (first,) = session.snapshot().pops
                assert first.state == ("talking" if answered else "ringing")
                await apply(
                    20, {"event": "recalled", "resource": "101", "contact_data": {"k": "v2"}}
                )
                assert await until(lambda: session.received == 2)
                recalled = session.snapshot().pops
                kept = [(contact, pop.id) for contact, pop in entry.pops.items()]
                await apply(40, {"event": "ended"})
                assert await until(lambda: session.changes == 1 + answered)
                assert await entry.dispatcher.drain(10)
                ended = session.snapshot().pops
            finally:
                await session.finish(5)
        newer, earlier = recalled
        assert (newer.contact_data, earlier.pop_id) == ((("k", "v2"),), first.pop_id)
        at = f"at {strftime('%H:%M:%S', localtime(newer.received_at))}"
        assert [(c.state, c.state_detail, c.talk_since) for c in recalled] == [
            ("ringing", "", None),
            ("popped again", at, None),
        ]
        assert kept == [("frank", newer.pop_id)]  # one pop followed per contact
        assert not entry.pops
        assert [(c.pop_id, c.state, c.state_detail) for c in ended] == [
            (newer.pop_id, "ended", "" if answered else "abandoned"),
            (earlier.pop_id, "popped again", at),
        ]
        lines = _lines(tmp_path / "w.jsonl")  # the ended change ran with the newer pop's fields
        assert [(r["change"], r["pop_id"], r["contact_data"]) for r in lines] == [
            ("ended", newer.pop_id, {"k": "v2"})
        ]

    run(body())
