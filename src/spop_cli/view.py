"""How `spop listen` looks: the rich live view and the plain log lines. Pure functions of their input."""

from __future__ import annotations

import time
from typing import Any

from .dispatch import FAILED, OK, SKIPPED, Outcome
from .session import ListenerRow, Snapshot

STATUS_STYLE = {
    "Status_Up": "bold green",
    "Status_Idle": "yellow",
    "Status_Reconnecting": "bold red",
    "Status_Down": "dim",
    "Status_Unknown": "magenta",
}
OUTCOME_MARK = {OK: ("✓", "green"), FAILED: ("✗", "bold red"), SKIPPED: ("–", "dim")}


def clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else ""


def render(snapshot: Snapshot) -> Any:
    """The whole live view: a table of listeners, then the latest pops with their actions' outcomes."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    # Pop fields are the caller's text: always Text, never markup (a `[link=…]` stays literal).
    listeners = Table(
        title=Text(f"spop listen · hub {snapshot.server}"), title_justify="left", expand=True
    )
    for column in (
        "media",
        "resource",
        "status",
        "pops",
        "last pop",
        "source",
        "queue",
        "retry",
        "failures",
    ):
        listeners.add_column(
            column, no_wrap=column in ("media", "resource", "status", "pops", "retry")
        )
    for row in snapshot.listeners:
        listeners.add_row(*_listener_cells(row))

    pops = Table(title="latest pops", title_justify="left", expand=True)
    for column in ("time", "listener", "source", "queue", "description", "wait", "actions"):
        pops.add_column(column)
    for pop in snapshot.pops:
        pops.add_row(
            clock(pop.received_at),
            Text(f"{pop.media} {pop.resource}"),
            Text(pop.source),
            Text(pop.queue),
            Text(pop.description),
            f"{pop.wait_time} s",
            _outcomes(pop.outcomes),
        )

    footer = Text()
    if snapshot.target is not None:
        handled = sum(row.pops_received for row in snapshot.listeners)
        footer.append(f"{handled}/{snapshot.target} pops  ")
    footer.append(f"{snapshot.pending} action runs pending  ")
    footer.append(
        f"{snapshot.failures} action failures", style="bold red" if snapshot.failures else "green"
    )
    footer.append("   Ctrl-C to stop", style="dim")
    return Group(listeners, pops, footer)


def _listener_cells(row: ListenerRow) -> list[Any]:
    from rich.text import Text

    retry = f"in {row.retry_in:.0f} s" if row.retry_in is not None else ""
    return [
        Text(row.media),
        Text(row.resource),
        Text(row.status, style=STATUS_STYLE.get(row.status, "")),
        str(row.pops_received),
        clock(row.last_pop_at),
        Text(row.last_source),
        Text(row.last_queue),
        retry,
        Text(str(row.failures), style="bold red" if row.failures else "dim"),
    ]


def _outcomes(outcomes: dict[str, Outcome]) -> Any:
    from rich.text import Text

    text = Text()
    for name, outcome in outcomes.items():
        mark, style = OUTCOME_MARK.get(outcome.status, ("?", ""))
        text.append(f"{mark} {name}", style=style)
        if outcome.status == FAILED and outcome.error:
            text.append(f" ({outcome.error})", style="red")
        text.append("  ")
    return text


# -- plain lines (not a terminal) -----------------------------------------------------------------
def status_line(listener: Any, old: Any, new: Any) -> str:
    return f"{clock(time.time())} {listener.media} {listener.resource or '-'}: {old} -> {new}"


def pop_line(listener: Any, pop: Any) -> str:
    parts = [f"{clock(time.time())} {pop.media} {pop.resource}: pop {pop.id}"]
    for label, value in (
        ("source", pop.source),
        ("destination", pop.destination),
        ("queue", pop.queue_name),
        ("from", pop.from_),
        ("redirect", pop.redirect),
    ):
        if value:
            parts.append(f"{label}={value!r}")
    parts.append(f"wait={pop.wait_time}s")
    return " ".join(parts)


def result_line(listener: Any, action: str, pop: Any, outcome: Outcome) -> str:
    detail = f": {outcome.error}" if outcome.error else ""
    return (
        f"{clock(time.time())} {pop.media} {pop.resource}: action {action} {outcome.status} "
        f"for pop {pop.id} in {outcome.duration:.3f} s{detail}"
    )


def listener_rows_plain(snapshot: Snapshot) -> list[str]:
    """One line per listener, for the end of a plain run."""
    return [
        f"{row.media} {row.resource}: {row.status}, {row.pops_received} pops, {row.failures} failures"
        for row in snapshot.listeners
    ]
