"""How `spop status` looks: the hub's status object in words a person reads. Pure functions."""

from __future__ import annotations

from typing import Any

# Every counter the hub keeps, in the order an operator reads them, with what it means.
# The hub reports only the counters that have moved: the others are shown as 0, not hidden.
COUNTERS = {
    "pops_accepted": "pops accepted",
    "delivered": "pops delivered",
    "acked": "pops acknowledged",
    "pending": "pops pending",
    "expired": "pops expired unacknowledged",
    "withdrawn": "pops withdrawn",
    "duplicates": "duplicate pops ignored",
    "unknown_acks": "acks for unknown pops",
    "rejected": "inputs rejected",
    "journal_refused": "pops refused (journal)",
    "contact_events": "contact events applied",
    "duplicate_events": "duplicate contact events",
    "contact_conflicts": "contact updates retried (cluster)",
    "contact_writes_replayed": "contact writes replayed (cluster)",
    "contact_writes_settled": "contact writes settled (cluster)",
    "changes_accepted": "contact changes accepted",
    "changes_pending": "contact changes pending",
    "changes_delivered": "contact changes delivered",
    "changes_acked": "contact changes acknowledged",
    "changes_expired": "contact changes expired",
    "frame_errors": "bad frames",
    "auth_failures": "wrong or missing tokens",
    "dead_peers": "silent connections closed",
    "slow_consumers_dropped": "slow listeners dropped",
    "refused_connections": "connections refused (limit)",
    "browser_streams_opened": "browser streams opened",
    "browser_refused": "browser requests refused",
}


def duration(seconds: float) -> str:
    """`42 s`, `3 min 5 s`, `2 h 10 min`, `3 d 4 h`: the two largest units."""
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def counter_rows(counters: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, label, value) for every known counter (0 when absent), then any the hub adds."""
    rows = [(key, label, str(counters.get(key, 0))) for key, label in COUNTERS.items()]
    rows += [
        (key, key.replace("_", " "), str(counters[key]))
        for key in sorted(counters)
        if key not in COUNTERS
    ]
    return rows


def render_status(address: str, data: dict[str, Any]) -> Any:
    """The hub's facts, its listeners, its counters; the hub's text is always Text, never markup."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from .textsafe import field

    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("hub", Text(f"{address} (spop {data.get('version', '?')})"))
    if "uptime" in data:
        facts.add_row("up for", duration(float(data["uptime"])))
    ports = f"listeners {data.get('port', '?')}"
    http_port = data.get("http_port")
    ports += f", HTTP {http_port}" if http_port not in (None, -1) else ", no HTTP"
    facts.add_row("ports", ports)
    nats = data.get("nats")
    if data.get("backend") == "nats" and isinstance(nats, dict):
        link = (
            f"via {nats.get('server')}"
            if nats.get("connected")
            else "NOT CONNECTED (reconnecting: sources get 503)"
        )
        facts.add_row(
            "backend",
            Text(
                f"NATS JetStream, stream {nats.get('stream')} "
                f"(replicas {nats.get('replicas')}), {link}",
                style="" if nats.get("connected") else "bold red",
            ),
        )
    else:
        facts.add_row("journal", Text(str(data.get("journal") or "off (pops in memory only)")))
    facts.add_row("connections", str(data.get("connections", 0)))
    facts.add_row("contacts tracked", str(data.get("contacts", 0)))
    facts.add_row("pops pending", str(data.get("pending", 0)))

    rows = data.get("listeners", [])
    listeners = Table(title=f"listeners ({len(rows)})", title_justify="left")
    for column in ("media", "resource", "connections"):
        listeners.add_column(column, justify="right" if column == "connections" else "left")
    for row in rows:
        listeners.add_row(
            *(field(row.get(key, "")) for key in ("media", "resource", "connections"))
        )
    if not rows:
        listeners.add_row(Text("none registered", style="dim"), "", "")

    counters = Table(title="counters", title_justify="left")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    counters.add_column("key", style="dim")
    for key, label, value in counter_rows(data.get("counters") or {}):
        counters.add_row(Text(label), Text(value, style="dim" if value == "0" else ""), Text(key))
    return Group(facts, Text(""), listeners, counters)
