"""A pop's text never drives the agent's terminal: escape sequences, C1 controls and bidi overrides
in any field (a caller sets Asterisk's CallerIDName; an HTTP source sets every field) are shown
escaped, as `\\x1b…`, by the live view, the `print` action's panel and the plain lines.

Read off a real pseudo-terminal: the raw bytes must carry none of them (only rich's own styling),
and the screen (pyte) must show them escaped, in cards whose borders still line up.
"""

from __future__ import annotations

import re
import signal
from types import SimpleNamespace

import pytest

pytest.importorskip("pyte")
from conftest import HubThread  # noqa: E402
from spop_cli import view  # noqa: E402
from spop_cli.actions.print import summary_line  # noqa: E402
from spop_cli.dispatch import FAILED, Outcome  # noqa: E402
from spop_cli.model import ContactChange, Media, ScreenPopEvent  # noqa: E402
from spop_cli.textsafe import inert  # noqa: E402

TITLE = "Bob\x1b]0;HACKED\x07\x1b[2J\x1b[38;5;201mRED"  # set the title, clear, colour
LINK = "\x1b]8;;http://evil.example/\x1b\\click\x1b]8;;\x1b\\"  # an OSC 8 hyperlink
DCS = "\x1bPq#0;2;0;0;0\x1b\\sixel"  # a device control string
C1 = "csi\x9b2Jcleared"  # U+009B: CSI as one C1 character
RLO = "invoice\u202etxt.exe"  # right-to-left override: shows "invoiceexe.txt"
ISOLATES = "a\u2066b\u2067c\u2068d\u2069e\u202ax\u202by\u202cz\u202dw"
HOSTILE_POP = {
    "id": "pop\x1b[5mBLINK",
    "media": "telephone",
    "resource": "13579",
    "source": TITLE,
    "destination": C1,
    "queue_name": LINK,
    "contact_description": DCS,
    "from": RLO,
    "redirect": ISOLATES,
    "wait_time": 3,
    "contact_data": {"key\x1b[7m": "value\x1b[38;5;201mpink", "markup": "[bold red]loud[/]"},
}
# each as the screen shows it: Python's escapes, the same --plain's repr() writes
SHOWN = [
    r"Bob\x1b]0;HACKED\x07\x1b[2J\x1b[38;5;201mRED",
    r"csi\x9b2Jcleared",
    r"invoice\u202etxt.exe",
    r"a\u2066b\u2067c\u2068d\u2069e\u202ax\u202by\u202cz\u202dw",
    "\\x1b]8;;http://evil.example/\\x1b\\click\\x1b]8;;\\x1b\\",  # ESC + backslash (ST): one backslash
    r"\x1bPq#0;2;0;0;0\x1b\sixel",
    r"key\x1b[7m",
    r"value\x1b[38;5;201mpink",
    "[bold red]loud[/]",  # rich markup in a field stays literal
]
# rich's own output: SGR styles, erase line, cursor up, cursor show/hide
RICH_CSI = re.compile(rb"\x1b\[(?:[0-9;]*m|2K|[0-9]*A|\?25[lh]|[0-9]*G)")
UNSAFE = re.compile("[\x80-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")


def assert_inert(raw: bytes) -> None:
    """Nothing but rich's own escape sequences reached the terminal."""
    rest = RICH_CSI.sub(b"", raw)
    assert b"\x1b" not in rest, rest[max(rest.index(b"\x1b") - 40, 0) : rest.index(b"\x1b") + 40]
    for payload in (b"\x1b[38;5;201m", b"\x1b[7m", b"\x1b[5m", b"\x1b[2J"):
        assert payload not in raw, payload
    text = raw.decode("utf-8", "replace")
    found = UNSAFE.search(text)
    assert found is None, (hex(ord(found.group())), text[found.start() - 40 : found.end() + 40])
    assert "\x07" not in text


def assert_shown(screen: str) -> None:
    for shown in SHOWN:
        assert shown in screen, (shown, screen)


def card_lines(screen: str, top: str, holding: str = "sixel") -> list[str]:
    """The lines of the box whose top line holds `top` and whose body holds `holding`."""
    lines = screen.splitlines()
    for start, line in enumerate(lines):
        if top in line and "╭" in line:
            left = line.index("╭")
            end = next(n for n in range(start, len(lines)) if lines[n][left:].startswith("╰"))
            box = [line[left:].rstrip() for line in lines[start : end + 1]]
            if holding in "\n".join(box):
                return box
    raise AssertionError(f"no box {top!r} holding {holding!r} in\n{screen}")


def assert_aligned(box: list[str]) -> None:
    """Every line of a box ends on its right border: escape bytes took no width of their own."""
    assert {len(line) for line in box} == {len(box[0])}, "\n".join(box)
    assert all(line[-1] in "╮│╯" for line in box), "\n".join(box)


def tracked_contact(hub: HubThread) -> None:
    """A tracked call popped to 13579, then requeued: the state row shows the new queue's name."""
    assert hub.hub is not None
    hub.call(
        hub.hub.apply_contacts(
            [
                {
                    "contact_id": "c\x1b[2Jx",
                    "event": "queued",
                    "source": "tracked\u202egnp",
                    "queue_name": "q1",
                },
                {"contact_id": "c\x1b[2Jx", "event": "routed", "resource": "13579"},
            ]
        )
    )


def requeue(hub: HubThread) -> None:
    assert hub.hub is not None
    hub.call(
        hub.hub.apply_contacts(
            {"contact_id": "c\x1b[2Jx", "event": "requeued", "queue_name": "Q\x1b]0;T2\x07x"}
        )
    )


def test_the_live_view_shows_hostile_fields_escaped(hub: HubThread, term_factory) -> None:
    term = term_factory("listen", "telephone", "13579", "--server", hub.address, lines=60)
    assert term.wait_for(lambda s: "Status_Up" in s), term.text()
    tracked_contact(hub)
    assert term.wait_for(lambda s: "ringing" in s), term.text()
    requeue(hub)
    assert term.wait_for(lambda s: "requeued" in s), term.text()
    hub.publish(HOSTILE_POP)
    assert term.wait_for(lambda s: "sixel" in s), term.text()
    term.pump(0.6)
    screen = term.text()
    assert_inert(bytes(term.raw))
    assert_shown(screen)
    assert r"requeued · Q\x1b]0;T2\x07x" in screen  # a change's text too
    assert r"tracked\u202egnp" in screen
    assert r"pop\x1b[5mBLINK" in screen  # the id
    assert_aligned(card_lines(screen, "telephone 13579 ·"))
    term.process.send_signal(signal.SIGINT)
    assert term.finish() == 0
    assert_inert(bytes(term.raw))


def test_the_print_panel_shows_hostile_fields_escaped(hub: HubThread, term_factory) -> None:
    term = term_factory(
        "listen", "telephone", "13579", "--server", hub.address, "--action", "print", lines=80
    )
    assert term.wait_for(lambda s: "Status_Up" in s), term.text()
    hub.publish(HOSTILE_POP)
    assert term.wait_for(lambda s: "✓ print" in s), term.text()
    term.pump(0.6)
    screen = term.text()
    assert_inert(bytes(term.raw))
    panel = card_lines(screen, "telephone pop for 13579")
    assert_shown("\n".join(panel))
    assert_aligned(panel)
    term.process.send_signal(signal.SIGINT)
    assert term.finish() == 0


def test_plain_lines_and_a_panel_without_the_live_view(hub: HubThread, term_factory) -> None:
    """--plain on a terminal: the panel printed straight to the tty, the log lines beside it."""
    term = term_factory(
        "listen", "telephone", "13579", "--server", hub.address, "--plain", "--action", "print",
        lines=80,
    )  # fmt: skip
    assert term.wait_for(lambda s: "Status_Up" in s), term.text()
    tracked_contact(hub)
    assert term.wait_for(lambda s: "queue='q1'" in s), term.text()
    requeue(hub)
    hub.publish(HOSTILE_POP)
    assert term.wait_for(lambda s: s.count("action print ok") == 2 and "requeued" in s), term.text()
    term.process.send_signal(signal.SIGINT)
    assert term.finish() == 0
    screen = term.scrollback()
    assert_inert(bytes(term.raw))
    assert_shown("\n".join(card_lines(screen, "telephone pop for 13579 ")))
    assert r"pop pop\x1b[5mBLINK" in screen  # the id in the pop's line
    assert r"requeued c\x1b[2Jx" in screen, screen  # the change's line: its contact id


def test_the_plain_texts_escape_every_field() -> None:
    """The lines off a terminal (the print action's summary, --plain's lines) escape too: a value
    without a space was written as is, and the ids, media and outcome messages always were."""
    pop = ScreenPopEvent.from_dict({**HOSTILE_POP, "contact_id": "c\x1b[2Jx"})
    summary = summary_line(pop)
    for name in ("source", "destination", "queue_name", "contact_description", "from", "redirect"):
        assert f"{name}={HOSTILE_POP[name]!r}" in summary, (name, summary)  # as --plain writes it
    assert r"key\x1b[7m='value\x1b[38;5;201mpink' markup='[bold red]loud[/]'" in summary
    listener = SimpleNamespace(media="telephone", resource="13579")
    change = ContactChange(
        "change-1",
        "c\x1b[2Jx",
        Media.telephone,
        "13579",
        HOSTILE_POP["id"],
        "requeued",
        "2024-05-14T09:00:00.000Z",
        reason="Q\x1b]0;T2\x07x",
    )
    outcome = Outcome(FAILED, 0.5, error="bad field \x1b]0;T\x07 in \u202eurl")
    lines = [
        summary,
        view.pop_line(listener, pop),
        view.change_line(listener, change),
        view.result_line(listener, "url", pop, outcome),
    ]
    for line in lines:
        assert "\x1b" not in line and "\x07" not in line and UNSAFE.search(line) is None, line
    assert r"pop pop\x1b[5mBLINK" in lines[1]
    assert r"requeued c\x1b[2Jx reason='Q\x1b]0;T2\x07x'" in lines[2]
    assert lines[3].endswith(
        r"failed for pop pop\x1b[5mBLINK in 0.500 s: bad field \x1b]0;T\x07 in \u202eurl"
    )


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain text, accents: chaîne1 €", "plain text, accents: chaîne1 €"),
        ("tab\tnew\nline\r", r"tab\tnew\nline\r"),
        ("\x00\x1b\x7f\x80\x9f", r"\x00\x1b\x7f\x80\x9f"),
        ("\u202e\u2066\u2069\u200e\u200f\u061c\ufeff\u200b", r"\u202e\u2066\u2069\u200e\u200f\u061c\ufeff\u200b"),
        ("\u2028\u2029", r"\u2028\u2029"),
        ("\ud800 lone", r"\ud800 lone"),  # a lone surrogate would not even encode
        ("tag\U000e0041", r"tag\U000e0041"),
        ("back\\slash [b]x[/b] :smile:", "back\\slash [b]x[/b] :smile:"),
        ("wide 日本 emoji 📞", "wide 日本 emoji 📞"),
    ],
)  # fmt: skip
def test_inert(text: str, shown: str) -> None:
    assert inert(text) == shown
