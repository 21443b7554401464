"""How `spop listen` looks: the rich live view and the plain log lines. Pure functions of their input."""

from __future__ import annotations

import time
from typing import Any

from .dispatch import FAILED, OK, SKIPPED, Outcome
from .session import POPPED_AGAIN, ListenerRow, PopRow, Snapshot
from .textsafe import field, inert

STATUS_STYLE = {
    "Status_Up": "bold green",
    "Status_Idle": "yellow",
    "Status_Reconnecting": "bold red",
    "Status_Down": "dim",
    "Status_Unknown": "magenta",
}
OUTCOME_MARK = {OK: ("✓", "green"), FAILED: ("✗", "bold red"), SKIPPED: ("–", "dim")}


def plural(count: int, word: str) -> str:
    """`1 pop`, `0 pops`, `2 pops`."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else ""


# Fixed widths (and ratios for the free text), so columns never jump from one frame to the next.
LISTENER_COLUMNS = (  # (title, width or None, ratio)
    ("media", 9, None),
    ("resource", 14, None),
    ("status", 19, None),
    ("pops", 5, None),
    ("last pop", 8, None),
    ("last source", None, 2),
    ("last queue", None, 3),
    ("retry", 8, None),
    ("failures", 8, None),
)
COLUMN_NAMES = tuple(name for name, _, _ in LISTENER_COLUMNS)
FREE_TEXT_ROOM = 30  # last source and last queue share it 2:3: under 12 and 18, they are left out
# What a narrow terminal leaves out, in this order, rather than cut the time of the last pop:
# the last source and queue (each card shows them), the failures (the footer counts them), the
# reconnect countdown. Media, resource, status, pops and the last pop's time always stay.
NARROW_DROPS = (("last source", "last queue"), ("failures",), ("retry",))
CARD_FIELDS = (  # (label, PopRow attribute)
    ("source", "source"),
    ("destination", "destination"),
    ("queue", "queue"),
    ("description", "description"),
    ("from", "from_"),
    ("redirect", "redirect"),
)
EMPTY = "–"  # a field the pop left empty: a dim dash, never a placeholder word


def render(
    snapshot: Snapshot, height: int | None = None, final: bool = False, width: int | None = None
) -> Any:
    """The whole live view: the listeners, then a card per pop (newest first), then the totals.

    With `height` (the terminal's lines), only the cards that fit are drawn, so the listeners and
    the totals never scroll off; the older ones are counted on one line. With `width` (its
    columns), the listener table leaves out what does not fit (`listener_columns`).
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    # Pop fields are the caller's text: always through `field` (textsafe.py), never markup (a
    # `[link=…]` stays literal) nor a control (an ESC in a caller's name would drive the terminal).
    title = field(f"spop listen · hub {snapshot.server}", "bold")
    columns = listener_columns(snapshot, width)
    # stretched to the terminal only with the free-text columns to take the room
    listeners = Table(expand=any(ratio for _, _, ratio in columns), padding=(0, 1))
    for name, size, ratio in columns:
        listeners.add_column(
            name,
            width=size,
            ratio=ratio,
            no_wrap=True,
            overflow="ellipsis",
            justify="right" if name in ("pops", "failures") else "left",
        )
    for row in snapshot.listeners:
        cells = dict(zip(COLUMN_NAMES, _listener_cells(row), strict=True))
        listeners.add_row(*(cells[name] for name, _, _ in columns))

    footer = Text()
    if snapshot.target is not None:
        handled = sum(row.pops_received for row in snapshot.listeners)
        footer.append(f"{handled}/{snapshot.target} pops  ")
    footer.append(f"{snapshot.pending} action runs pending  ")
    footer.append(
        f"{snapshot.failures} action failure{'' if snapshot.failures == 1 else 's'}",
        style="bold red" if snapshot.failures else "green",
    )
    footer.append("   stopped" if final else "   Ctrl-C to stop", style="dim")

    parts: list[Any] = [title, listeners]
    heading = Text("latest pops", style="bold")
    if not snapshot.pops:
        heading.append("  none yet: each pop shows here as a card, newest first", style="dim")
    parts.append(heading)
    # title 1 + table (4 + rows) + heading 1 + footer 1
    room = None if height is None else height - (7 + len(snapshot.listeners))
    shown = 0
    for pop in snapshot.pops:
        card = pop_card(pop)
        lines = card_height(pop)
        if room is not None:
            if lines > room - 1 and shown:  # keep a line for "N older pops"
                break
            room -= lines
        parts.append(card)
        shown += 1
    if shown < len(snapshot.pops):
        older = len(snapshot.pops) - shown
        parts.append(Text(f"+ {older} older pop{'' if older == 1 else 's'} not shown", style="dim"))
    parts.append(footer)
    return Group(*parts)


def listener_columns(
    snapshot: Snapshot, width: int | None = None
) -> list[tuple[str, int | None, int | None]]:
    """The listener table's columns for a terminal `width` columns wide (None: all of them).

    The resource column is as wide as the longest resource (at least its title, at most 14): the
    listeners do not change during a run, so neither does it. Then, while the table does not fit,
    the columns of NARROW_DROPS are left out in turn: an 80-column terminal shows media, resource,
    status, pops, the last pop's time in full and the countdown, never `11:0…`.
    """
    from rich.cells import cell_len

    longest = max((cell_len(inert(row.resource)) for row in snapshot.listeners), default=0)
    columns = [
        (name, min(14, max(len(name), longest)) if name == "resource" else size, ratio)
        for name, size, ratio in LISTENER_COLUMNS
    ]
    if width is None:
        return columns
    for dropped in NARROW_DROPS:
        if _table_width(columns) <= width:
            break
        columns = [column for column in columns if column[0] not in dropped]
    return columns


def _table_width(columns: list[tuple[str, int | None, int | None]]) -> int:
    """A bordered table's width: its columns, one space each side, a rule between and around."""
    free = FREE_TEXT_ROOM if any(ratio for _, _, ratio in columns) else 0
    return sum(size or 0 for _, size, _ in columns) + free + 3 * len(columns) + 1


def card_rows(pop: PopRow) -> list[tuple[Any, Any]]:
    """(label, value) rows of a pop's card: its fields, wait time, contact data, actions."""
    from rich.text import Text

    rows: list[tuple[Any, Any]] = []
    for label, attribute in CARD_FIELDS:
        value = getattr(pop, attribute)
        if value or label in ("source", "destination", "queue"):
            rows.append((label, field(value) if value else Text(EMPTY, style="dim")))
    rows.append(("wait", Text(f"{pop.wait_time} s")))
    if pop.state:  # the contact moved since the pop (contact updates)
        rows.append(("state", state_text(pop)))
    for key, value in pop.contact_data:
        rows.append((field(key, "magenta"), field(value) if value else Text(EMPTY, style="dim")))
    if pop.outcomes:
        rows.append(("actions", _outcomes(pop.outcomes)))
    return rows


def state_text(pop: PopRow, now: float | None = None) -> Any:
    """`talking 1:05` (a running clock), `ended · talked 2:10`, `transferred · to 54321`,
    `popped again · at 11:02:03` (dim: a newer card of the same contact follows it)…"""

    style = {"talking": "bold green", POPPED_AGAIN: "dim"}.get(pop.state, "yellow")
    text = field(pop.state, style)
    if pop.state == "talking" and pop.talk_since is not None:
        text.append(" " + minutes((now or time.time()) - pop.talk_since))
    if pop.state == "ended" and pop.talk_time:
        text.append(f" · talked {minutes(pop.talk_time)}")
    if pop.state_detail:  # a name, a number, a queue's name: the source's text
        text.append(f" · {inert(pop.state_detail)}")
    return text


def minutes(seconds: float) -> str:
    whole = max(0, int(seconds))
    return f"{whole // 60}:{whole % 60:02d}"


def change_line(listener: Any, change: Any) -> str:
    """A contact change as one plain line (not a terminal, no --json)."""
    parts = [
        f"{clock(time.time())} {change.media} {inert(change.resource)}:"
        f" {inert(change.change)} {inert(change.contact_id)}"
    ]
    for label in ("answered_by", "transferred_to", "consulted", "reason"):
        value = getattr(change, label)
        if value:
            parts.append(f"{label}={value!r}")
    if change.change == "ended":
        parts.append(f"talk={change.talk_time}s")
    return " ".join(parts)


def card_height(pop: PopRow) -> int:
    """Lines the card takes: its rows (one line each, never wrapped), the id and two borders."""
    return len(card_rows(pop)) + 3


def pop_card(pop: PopRow) -> Any:
    """One pop as a card: who it is for and when in the title, every field inside."""
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column(no_wrap=True, overflow="ellipsis", max_width=100)
    for label, value in card_rows(pop):
        grid.add_row(label, value)
    grid.add_row(Text("id", style="dim"), field(pop.pop_id, "dim"))
    title = field(f"{pop.media} {pop.resource} · {clock(pop.received_at)}", "bold")
    return Panel(grid, title=title, title_align="left", expand=False)


def fingerprint(snapshot: Snapshot) -> Any:
    """What the view shows, to redraw only when it changes (the countdown to the second)."""
    import dataclasses

    rows = tuple(
        dataclasses.replace(row, retry_in=None if row.retry_in is None else round(row.retry_in))
        for row in snapshot.listeners
    )
    # a talking contact's clock changes every second: redraw for it
    clocks = tuple(
        int(time.time() - pop.talk_since) if pop.state == "talking" and pop.talk_since else None
        for pop in snapshot.pops
    )
    return dataclasses.replace(snapshot, listeners=rows), clocks


def _listener_cells(row: ListenerRow) -> list[Any]:
    from rich.text import Text

    retry = f"in {row.retry_in:.0f} s" if row.retry_in is not None else ""
    return [
        field(row.media),
        field(row.resource),
        Text(row.status, style=STATUS_STYLE.get(row.status, "")),
        Text(str(row.pops_received)),
        Text(clock(row.last_pop_at)),
        field(row.last_source),
        field(row.last_queue),
        Text(retry),
        Text(str(row.failures), style="bold red" if row.failures else "dim"),
    ]


def _outcomes(outcomes: dict[str, Outcome]) -> Any:
    from rich.text import Text

    text = Text()
    for name, outcome in outcomes.items():
        mark, style = OUTCOME_MARK.get(outcome.status, ("?", ""))
        text.append(f"{mark} {inert(name)}", style=style)
        if outcome.status == FAILED and outcome.error:  # may echo the pop's fields
            text.append(f" ({inert(outcome.error)})", style="red")
        text.append("  ")
    return text


# -- plain lines (not a terminal) -----------------------------------------------------------------
def status_line(listener: Any, old: Any, new: Any) -> str:
    return (
        f"{clock(time.time())} {listener.media} {inert(listener.resource or '-')}: {old} -> {new}"
    )


def pop_line(listener: Any, pop: Any) -> str:
    # the values as repr() writes them (escaped), the rest through inert(): no control is written
    parts = [f"{clock(time.time())} {pop.media} {inert(pop.resource)}: pop {inert(pop.id)}"]
    for label, value in (
        ("source", pop.source),
        ("destination", pop.destination),
        ("queue", pop.queue_name),
        ("description", pop.contact_description),
        ("from", pop.from_),
        ("redirect", pop.redirect),
    ):
        if value:
            parts.append(f"{label}={value!r}")
    parts.append(f"wait={pop.wait_time}s")
    parts.extend(f"data.{inert(item.key)}={item.value!r}" for item in pop.contact_data)
    return " ".join(parts)


def result_line(listener: Any, action: str, pop: Any, outcome: Outcome) -> str:
    detail = f": {inert(outcome.error)}" if outcome.error else ""
    return (
        f"{clock(time.time())} {pop.media} {inert(pop.resource)}:"
        f" action {inert(action)} {outcome.status} "
        f"for {_what(pop)} in {outcome.duration:.3f} s{detail}"
    )


def _what(pop: Any) -> str:
    """`pop ID`, or `ended of pop ID` for an action a contact change ran."""
    change = getattr(pop, "change_event", None)
    return inert(
        f"{change.change} of pop {change.pop_id}" if change is not None else f"pop {pop.id}"
    )


def listener_rows_plain(snapshot: Snapshot) -> list[str]:
    """One line per listener, for the end of a plain run."""
    return [
        f"{inert(row.media)} {inert(row.resource)}: {row.status}, {plural(row.pops_received, 'pop')},"
        f" {plural(row.failures, 'failure')}"
        for row in snapshot.listeners
    ]
