"""Built-in action `print`: a rich panel on a terminal, one plain summary line otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ..hookspecs import hookimpl
from ..textsafe import UNSAFE, field, inert
from . import check_keys, stream_option

# Set by a live view while it is on screen: the panel goes through its console, above the live
# region. A panel written to the terminal beside it would be erased by the next redraw.
_print_above: Callable[[Any], None] | None = None


def print_above(printer: Callable[[Any], None] | None) -> None:
    """Route the panels meant for the terminal (stdout/stderr) through `printer`; None: stop."""
    global _print_above
    _print_above = printer


@hookimpl
def register_actions(register):
    register("print", PrintAction)


def summary_line(pop: Any) -> str:
    """One line a person or grep can read: time, media, resource, the fields that are set.

    A value with a space or a control character is quoted and escaped as repr() writes it (a
    caller's ESC must not reach the terminal the line is read on); the rest goes through inert.
    """
    data = pop.to_dict()
    parts = [inert(data["created_at"]), inert(data["media"]), inert(data["resource"])]
    for name in ("source", "destination", "queue_name", "contact_description", "from", "redirect"):
        value = data[name]
        if value:
            quoted = " " in value or UNSAFE.search(value) is not None
            parts.append(f"{name}={value!r}" if quoted else f"{name}={value}")
    parts.append(f"wait_time={data['wait_time']}")
    parts.extend(f"{inert(key)}={value!r}" for key, value in data["contact_data"].items())
    return " ".join(parts)


def pop_panel(pop: Any) -> Any:
    """The pop as a rich Panel: the fields that are set, then the contact data."""
    from rich.panel import Panel
    from rich.table import Table

    # Every value from the pop goes in through `field` (textsafe.py): a caller's `[link=…]` stays
    # literal, not markup, and an escape sequence in it is shown escaped, not sent to the terminal.
    data = pop.to_dict()
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for name in ("source", "destination", "queue_name", "contact_description", "from", "redirect"):
        if data[name]:
            table.add_row(name, field(data[name]))
    table.add_row("wait_time", f"{data['wait_time']} s")
    for key, value in data["contact_data"].items():
        table.add_row(field(key, "magenta"), field(value))
    title = field(f"{data['media']} pop for {data['resource']}")
    return Panel(table, title=title, subtitle=field(data["created_at"]), expand=False)


class PrintAction:
    """Shows the pop where the agent looks: the terminal spop runs in."""

    def __init__(self, table: dict[str, Any]) -> None:
        check_keys(table, {"stream"})
        self.name = "print"
        self._stream = stream_option(table)

    def run(self, pop: Any) -> None:
        stream = self._stream()
        printer = _print_above
        if printer is not None and stream in (sys.stdout, sys.stderr):
            printer(pop_panel(pop))
        elif _isatty(stream):
            from rich.console import Console

            Console(file=stream).print(pop_panel(pop))
        else:
            stream.write(summary_line(pop) + "\n")
            stream.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
