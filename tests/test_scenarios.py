"""Scenario files (spop_cli.scenario): every builtin plays to its expected pops; loader errors."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from guide_pops import EMPTY_POP as GUIDE_EMPTY_POP
from spop_cli.hub.contacts import ContactTracker
from spop_cli.scenario import Scenario, builtin_names, load_scenario, timeline

START = datetime(2024, 5, 14, 9, 0, 0, tzinfo=UTC)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "contacts.md"
# SPEC §2: the guide's three scenarios and every case its overview names.
OVERVIEW = {
    "routed-call": "telephone",
    "consultation": "telephone",
    "requeue": "telephone",
    "direct-call": "telephone",
    "conference": "telephone",
    "ivr-handover": "telephone",
    "recall": "telephone",
    "pickup": "telephone",
    "transfer": "telephone",
    "forwarded-call": "telephone",
    "callback-routed": "callback",
    "email-routed": "email",
    "email-requeued": "email",
    "email-transferred": "email",
    "email-deferred-resumed": "email",
    "webcollab-routed": "webcollab",
    "webcollab-invitation": "webcollab",
    "webcollab-requeue-transfer": "webcollab",
}
EMPTY_POP = {**GUIDE_EMPTY_POP, "contact_data": []}  # pairs, so order is compared


def ordered(pop: dict) -> dict:
    """A pop or expect entry with contact_data as ordered pairs, so order is compared too."""
    return {**pop, "contact_data": list(pop.get("contact_data", {}).items())}


def test_every_overview_scenario_is_builtin():
    assert sorted(OVERVIEW) == builtin_names()


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_plays_to_its_expected_pops(name):
    scenario = load_scenario(name)
    assert scenario.name == name and scenario.description and scenario.expect
    outcomes = ContactTracker().apply_batch(timeline(scenario, START), START)
    pops = [pop.to_dict() for outcome in outcomes for pop in outcome.pops]
    for pop in pops:
        del pop["id"], pop["created_at"]
    assert [ordered(pop) for pop in pops] == [EMPTY_POP | ordered(e) for e in scenario.expect]
    assert {pop["media"] for pop in pops} == {OVERVIEW[name]}


def test_timeline_fills_absolute_times():
    scenario = Scenario(
        "t",
        "",
        [(0.0, {"contact_id": "c", "event": "queued"}), (1.5, {"contact_id": "c", "event": "x"})],
        [],
    )
    played = timeline(scenario, datetime(2024, 5, 14, 9, 0, 0), contact_suffix="-run7")
    assert played == [
        {"contact_id": "c-run7", "event": "queued", "at": "2024-05-14T09:00:00.000Z"},
        {"contact_id": "c-run7", "event": "x", "at": "2024-05-14T09:00:01.500Z"},
    ]
    assert scenario.events[0][1]["contact_id"] == "c"  # the scenario itself is untouched


def test_guide_requeue_timeline():
    played = timeline(load_scenario("requeue"), START)
    assert [(e["event"], e["at"][11:19]) for e in played] == [
        ("queued", "09:00:00"),
        ("routed", "09:00:10"),
        ("answered", "09:00:15"),
        ("requeued", "09:00:45"),
        ("routed", "09:00:50"),
    ]
    assert "after" not in played[0]


def test_load_from_path(tmp_path):
    path = tmp_path / "my-call.toml"
    path.write_text(
        'description = "mine"\n'
        '[[events]]\ncontact_id = "c"\nevent = "routed"\nresource = "1"\n'
        'contact_data = { b = "1", a = "2" }\n',
        encoding="utf-8",
    )
    for given in (path, str(path)):
        scenario = load_scenario(given)
        assert (scenario.name, scenario.description, scenario.expect) == ("my-call", "mine", [])
        assert scenario.events[0][0] == 0.0
        assert list(scenario.events[0][1]["contact_data"]) == ["b", "a"]


EVENT = '[[events]]\ncontact_id = "c"\nevent = "queued"\n'


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        ("description = ", "not valid TOML"),
        ('descriptoin = "x"\n' + EVENT, "descriptoin: unknown key"),
        ("description = 3\n" + EVENT, "description: must be a string"),
        ('description = "x"\n', "events: at least one"),
        ("events = 3\n", "events: must be an array of tables"),
        (EVENT + "after = -1\n", "events[0].after"),
        (EVENT + 'after = "10"\n', "events[0].after"),
        (EVENT + "after = true\n", "events[0].after"),
        (EVENT + 'at = "2024-05-14T09:00:00Z"\n', "events[0].at"),
        (EVENT + EVENT.replace('contact_id = "c"\n', ""), "events[1].contact_id"),
        (EVENT.replace('"queued"', '""'), "events[0].event"),
        (EVENT + "resource = 13579\n", "events[0].resource: must be a string"),
        (EVENT + "contact_data = { k = 1 }\n", "events[0].contact_data"),
        (EVENT + "[[expect]]\nqueue = 'x'\n", "expect[0].queue: not a pop field"),
        (EVENT + "[[expect]]\nwait_time = '10'\n", "expect[0].wait_time: must be an integer"),
        (EVENT + "[[expect]]\nsource = 12345\n", "expect[0].source: must be a string"),
    ],
)
def test_loader_names_file_and_key(tmp_path, content, fault):
    path = tmp_path / "bad.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        load_scenario(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert fault in str(caught.value)


def test_unknown_name_lists_builtins(tmp_path):
    with pytest.raises(ValueError, match="routed-call"):
        load_scenario("no-such-scenario")
    with pytest.raises(ValueError, match="missing.toml"):
        load_scenario(tmp_path / "missing.toml")


def test_docs_name_every_builtin():
    text = DOCS.read_text(encoding="utf-8")
    missing = [name for name in builtin_names() if f"`{name}`" not in text]
    assert not missing
