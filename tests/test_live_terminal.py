"""`spop listen`'s live view read off a real pseudo-terminal through a terminal emulator (pyte).

Why pyte and not the byte stream: a panel written and then erased by the next redraw is in the
bytes but not on the screen; only an emulator that applies the cursor moves and erases tells the
two apart (issue 17, Broken 1).
"""

from __future__ import annotations

import signal

import pytest

pytest.importorskip("pyte")
from conftest import HubThread, wait_for  # noqa: E402
from guide_pops import GUIDE_POP  # noqa: E402


def registered(hub: HubThread, resource: str) -> bool:
    return any(row["resource"] == resource for row in hub.status()["listeners"])


def test_print_panels_stay_above_the_live_view(hub: HubThread, term_factory) -> None:
    term = term_factory(
        "listen", "telephone", "13579", "--server", hub.address, "--action", "print", lines=60
    )
    assert wait_for(lambda: registered(hub, "13579") or term.process.poll() is not None, 20)
    assert term.wait_for(lambda s: "Status_Up" in s), term.text()
    hub.publish(GUIDE_POP)
    assert term.wait_for(lambda s: "✓ print" in s), term.text()
    hub.publish({**GUIDE_POP, "source": "99999", "contact_data": {"ticket": "T-42"}})
    assert term.wait_for(lambda s: s.count("✓ print") == 2), term.text()
    term.pump(0.6)  # a few more redraw periods: nothing may erase the panels
    screen = term.text()
    lines = screen.splitlines()
    panels = [n for n, line in enumerate(lines) if "telephone pop for 13579" in line]
    view = next(n for n, line in enumerate(lines) if "spop listen · hub" in line)
    assert len(panels) == 2, screen  # both panels still on screen
    assert all(n < view for n in panels), screen  # above the live view
    assert "chaîne1" in "\n".join(lines[panels[0] : panels[1]])  # the first panel, whole
    assert "T-42" in "\n".join(lines[panels[1] : view])
    assert screen.count("spop listen · hub") == 1  # no torn half-frame left behind
    term.process.send_signal(signal.SIGINT)
    assert term.finish() == 0


def test_a_listener_without_actions_shows_each_pop_as_a_card(hub: HubThread, term_factory) -> None:
    term = term_factory("listen", "telephone", "13579", "--server", hub.address)
    assert term.wait_for(lambda s: "Status_Up" in s), term.text()
    hub.publish({**GUIDE_POP, "from": "13580", "redirect": "0600000000"})
    hub.publish({**GUIDE_POP, "source": "55555", "contact_data": {}})
    assert term.wait_for(lambda s: "55555" in s and "chaîne1" in s), term.text()
    screen = term.text()
    for shown in ("2468", "File d'attente des ventes", "Ventes", "13580", "0600000000", "10 s"):
        assert shown in screen, (shown, screen)
    assert screen.index("55555") < screen.index("chaîne1")  # newest first
    assert "[vide]" not in screen
    term.process.send_signal(signal.SIGINT)
    assert term.finish() == 0


def test_the_columns_do_not_move_between_frames(hub: HubThread, term_factory) -> None:
    term = term_factory("listen", "telephone", "13579", "--server", hub.address)
    assert term.wait_for(lambda s: "Status_Up" in s), term.text()
    header = next(line for line in term.screen.display if "media" in line and "resource" in line)
    hub.publish({**GUIDE_POP, "source": "1", "queue_name": "Q" * 40})
    assert term.wait_for(lambda s: "QQQQ" in s), term.text()
    after = next(line for line in term.screen.display if "media" in line and "resource" in line)
    assert after == header


def test_no_hub_leaves_no_empty_view_and_says_what_to_do(term_factory) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    term = term_factory("listen", "telephone", "13579", "--server", f"{port}@127.0.0.1")
    assert term.finish() == 3
    screen = term.text()
    assert "SCREENPOP_Cannot_Find_HiPath_ProCenter" in screen
    assert f"Is `spop serve` running at {port}@127.0.0.1?" in screen
    assert "spop listen · hub" not in screen  # no empty live view drawn above the error
    assert "connecting" not in screen  # the spinner is gone


def test_spop_send_labels_the_id_on_a_terminal(hub: HubThread, term_factory) -> None:
    term = term_factory("send", "telephone", "13579", "--server", hub.address, "--id", "pop-7")
    assert term.finish() == 0
    assert f"pop id pop-7: accepted by the hub at {hub.address} for telephone 13579" in term.text()


def test_an_idle_view_is_not_redrawn(hub: HubThread, term_factory) -> None:
    """Nothing changes, nothing is written: an idle desk costs no redraws (it ran at 4 a second)."""
    term = term_factory("listen", "telephone", "13579", "--server", hub.address)
    assert term.wait_for(lambda s: "Status_Up" in s), term.text()
    term.pump(0.6)  # the frame after the connection settles
    written = len(term.raw)
    term.pump(1.5)  # six redraw periods
    assert len(term.raw) == written
    hub.publish(GUIDE_POP)  # a change is drawn at once
    assert term.wait_for(lambda s: "chaîne1" in s, timeout=10), term.text()
    assert len(term.raw) > written


def test_no_torn_frames_in_the_scrollback(hub: HubThread, term_factory) -> None:
    """Panels pushed off the top leave whole panels in the scrollback, never pieces of the view."""
    term = term_factory(
        "listen", "telephone", "13579", "--server", hub.address, "--action", "print", lines=30
    )
    assert term.wait_for(lambda s: "Status_Up" in s), term.text()
    for n in range(5):
        hub.publish({**GUIDE_POP, "source": f"caller-{n}"})
        assert term.wait_for(lambda s, n=n: f"caller-{n}" in s), term.text()
    assert term.wait_for(lambda s: "│     5 │" in s), term.text()  # the listener row: 5 pops
    term.pump(0.6)
    everything = term.scrollback()
    assert everything.count("spop listen · hub") == 1, everything  # only the live one
    assert everything.count("telephone pop for 13579") == 5  # every panel, once
    for n in range(5):
        assert f"caller-{n}" in everything
    term.process.send_signal(signal.SIGINT)
    assert term.finish() == 0


def test_a_card_popped_again_does_not_stay_ringing_after_the_hang_up(
    hub: HubThread, term_factory
) -> None:
    """The field report "a pop that stays on screen after hang-up": queued, rung at 101, rung at
    101 again (a queue's ring-no-answer retry: `recalled`), then the caller hangs up."""
    assert hub.hub is not None
    term = term_factory("listen", "telephone", "101", "--server", hub.address, lines=40)
    assert term.wait_for(lambda s: "Status_Up" in s), term.text()

    def post(*events: dict) -> None:
        hub.call(hub.hub.apply_contacts([{"contact_id": "frank", **e} for e in events]))

    post({"event": "queued", "source": "+15550100", "queue_name": "nightshift"},
         {"event": "routed", "resource": "101"})  # fmt: skip
    assert term.wait_for(lambda s: "ringing" in s), term.text()
    post({"event": "recalled", "resource": "101"})
    assert term.wait_for(lambda s: "popped again" in s), term.text()
    post({"event": "ended"})
    assert term.wait_for(lambda s: "ended · abandoned" in s), term.text()
    term.pump(0.6)
    states = [
        line.split("│")[1].split()[1:] for line in term.text().splitlines() if "│ state" in line
    ]
    assert len(states) == 2, term.text()
    assert states[0] == ["ended", "·", "abandoned"]  # the newer card, on top
    assert states[1][:4] == ["popped", "again", "·", "at"]
    assert "ringing" not in term.text()
    term.process.send_signal(signal.SIGINT)
    assert term.finish() == 0


def _listener_table(screen: str) -> tuple[str, str]:
    """The header and the first row of the listener table."""
    lines = screen.splitlines()
    header = next(n for n, line in enumerate(lines) if "media" in line and "resource" in line)
    return lines[header], lines[header + 2]


@pytest.mark.parametrize(
    ("columns", "titles"),
    [
        (80, ["media", "resource", "status", "pops", "last pop", "retry"]),
        (100, ["media", "resource", "status", "pops", "last pop", "retry", "failures"]),
        (160, ["media", "resource", "status", "pops", "last pop", "last source", "last queue",
               "retry", "failures"]),
    ],
)  # fmt: skip
def test_a_narrow_terminal_leaves_columns_out_and_keeps_the_time_whole(
    hub: HubThread, term_factory, columns: int, titles: list[str]
) -> None:
    import re

    term = term_factory("listen", "telephone", "13579", "--server", hub.address, columns=columns)
    assert term.wait_for(lambda s: "Status_Up" in s), term.text()
    hub.publish(GUIDE_POP)
    assert term.wait_for(lambda s: "chaîne1" in s), term.text()
    term.pump(0.6)
    header, row = _listener_table(term.text())
    assert [title.strip() for title in header.strip("┃").split("┃")] == titles, header
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[:4] == ["telephone", "13579", "Status_Up", "1"], row
    assert re.fullmatch(r"\d\d:\d\d:\d\d", cells[4]), row  # the time whole, never `11:0…`
    assert "…" not in header
    if columns == 160:
        assert cells[5:7] == ["12345", "File d'attente des ventes"], row
    assert all(len(line) <= columns for line in term.text().splitlines())
    term.process.send_signal(signal.SIGINT)
    assert term.finish() == 0


def _sgr_parameters(raw: bytes) -> set[int]:
    import re

    found = set()
    for params in re.findall(rb"\x1b\[([0-9;]*)m", raw):
        found.update(int(p) for p in params.split(b";") if p)
    return found


@pytest.mark.parametrize("no_color", [False, True])
def test_no_color_draws_the_view_without_colour(
    hub: HubThread, term_factory, no_color: bool
) -> None:
    env = {"NO_COLOR": "1"} if no_color else {}
    term = term_factory(
        "listen", "telephone", "13579", "--server", hub.address, "--action", "print", env=env
    )
    assert term.wait_for(lambda s: "Status_Up" in s), term.text()
    hub.publish(GUIDE_POP)
    assert term.wait_for(lambda s: "✓ print" in s), term.text()
    term.process.send_signal(signal.SIGINT)
    assert term.finish() == 0
    used = _sgr_parameters(bytes(term.raw))
    colours = {p for p in used if 30 <= p <= 38 or 40 <= p <= 48 or 90 <= p <= 107}
    assert 1 in used  # bold either way
    assert bool(colours) is not no_color, sorted(used)
