"""The live view is a pure function of a snapshot: render it and read the text."""

from __future__ import annotations

import pytest
from rich.console import Console

from spop_cli.dispatch import Outcome
from spop_cli.session import ListenerRow, PopRow, Snapshot
from spop_cli.view import render


def text_of(snapshot: Snapshot) -> str:
    console = Console(record=True, width=180, color_system=None)
    console.print(render(snapshot))
    return console.export_text()


def test_rows_countdown_and_failures() -> None:
    rows = (
        ListenerRow(
            "telephone",
            "13579",
            "Status_Up",
            3,
            1_700_000_000.0,
            "12345",
            "Ventes",
            None,
            0,
            ("screen",),
        ),
        ListenerRow("email", "agent7", "Status_Reconnecting", 0, None, "", "", 12.4, 2, ("hook",)),
    )
    pops = (
        PopRow(
            1_700_000_000.0, "telephone", "13579", "p1", "12345", "Ventes", "Sales", 10,
            {"screen": Outcome("ok", 0.01), "hook": Outcome("failed", 10.0, "timed out after 10 s"),
             "crm": Outcome("skipped", 0.0, "when: ...")},
        ),
    )  # fmt: skip
    text = text_of(Snapshot("6000@hub", rows, pops, failures=2, pending=1, target=5))
    assert "spop listen · hub 6000@hub" in text
    assert "Status_Reconnecting" in text and "in 12 s" in text
    assert "Status_Up" in text and "Ventes" in text
    assert "✓ screen" in text and "✗ hook (timed out after 10 s)" in text and "– crm" in text
    assert "3/5 pops" in text and "1 action runs pending" in text and "2 action failures" in text


def test_an_empty_snapshot_renders() -> None:
    text = text_of(Snapshot("6000@hub", (), (), failures=0, pending=0, target=None))
    assert "latest pops" in text and "0 action failures" in text


@pytest.mark.parametrize("source", ["[link=https://evil.example]Call bank[/link]", "[/]"])
def test_caller_text_is_never_markup(source: str) -> None:
    import io

    rows = (
        ListenerRow(
            "telephone",
            "13579",
            "Status_Up",
            1,
            1_700_000_000.0,
            source,
            source,
            None,
            0,
            ("screen",),
        ),
    )
    pops = (
        PopRow(1_700_000_000.0, "telephone", "13579", "p1", source, source, source, 10, {}),
    )  # fmt: skip
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="truecolor", width=400)
    console.print(render(Snapshot("6000@hub", rows, pops, failures=0, pending=0, target=None)))
    text = out.getvalue()
    assert "\x1b]8;" not in text  # no OSC-8 hyperlink
    assert text.count(source) == 5  # listener source and queue, pop source, queue, description


def card_pop(n: int, **fields) -> PopRow:
    return PopRow(
        1_700_000_000.0 + n, "telephone", "13579", f"p{n}", f"src{n}", "Ventes", "", 10,
        {}, **fields,
    )  # fmt: skip


def test_a_card_shows_every_field_and_the_contact_data() -> None:
    pop = card_pop(
        1, destination="2468", from_="13580", redirect="0600", contact_data=(("code1", "chaîne1"),)
    )
    text = text_of(Snapshot("6000@hub", (), (pop,), failures=0, pending=0, target=None))
    lines = [" ".join(line.strip("│ ").split()) for line in text.splitlines()]
    for row in ("source src1", "destination 2468", "queue Ventes", "from 13580",
                "redirect 0600", "wait 10 s", "code1 chaîne1", "id p1"):  # fmt: skip
        assert row in lines, (row, text)
    assert "description" not in text  # an empty optional field takes no line


def test_cards_fit_the_terminal_newest_first_and_the_rest_are_counted() -> None:
    from spop_cli.view import card_height

    pops = tuple(card_pop(n) for n in range(12, 0, -1))  # newest first
    height = 7 + 3 * card_height(pops[0]) + 1  # room for three cards and the "older" line
    console = Console(record=True, width=120, height=height, color_system=None)
    console.print(render(Snapshot("6000@hub", (), pops, 0, 0, None), height))
    text = console.export_text()
    assert [n for n in range(1, 13) if f"src{n} " in text] == [10, 11, 12]
    assert "+ 9 older pops not shown" in text
    assert text.rstrip().endswith("Ctrl-C to stop")  # the totals stay on screen
    assert len(text.rstrip("\n").splitlines()) <= height
