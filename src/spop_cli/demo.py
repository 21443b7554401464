"""`spop demo`: a hub on free loopback ports, listeners on the guide's extensions, the guide's
scenarios played through it, every pop shown as it arrives; then everything shuts down."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from typing import Any

from . import client
from .diagnostics import close_diagnostics
from .hub.server import Hub, HubConfig
from .listener.core import AsyncListener
from .model import MEDIA_FIELDS, ListenerStatus, ScreenPopEvent
from .scenario import load_scenario
from .simulate import play
from .view import EMPTY

SCENARIOS = ("consultation", "requeue", "callback-routed", "email-routed", "webcollab-invitation")


def _render(event: ScreenPopEvent, console: Any) -> None:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    table = Table.grid(padding=(0, 2))
    data = event.to_dict()
    names = ("resource", *MEDIA_FIELDS[event.media], "wait_time")
    for name in names:
        value = str(data[name])
        table.add_row(name, Text(value) if value else Text(EMPTY, style="dim"))
    pairs = ", ".join(f"({item.key}, {item.value})" for item in event.contact_data)
    table.add_row("contact_data", Text(pairs) if pairs else Text(EMPTY, style="dim"))
    title = f"{type(event).__name__} → {event.media} {event.resource}"
    console.print(Panel(table, title=title, expand=False))


async def run_demo(delay: float = 0.4) -> int:
    """Return 0 when every pop the scenarios expect arrived at its listener and nowhere else.

    The hub's and the listeners' diagnostics go to a temporary folder, removed at the end: the
    demo leaves nothing behind, and nothing in the user's own diagnostics.
    """
    saved = os.environ.get("SPOP_DIAG_DIR")
    with tempfile.TemporaryDirectory(prefix="spop-demo-") as diag:
        os.environ["SPOP_DIAG_DIR"] = diag  # where the listeners open their set
        try:
            return await _demo(delay, diag)
        finally:
            if saved is None:
                os.environ.pop("SPOP_DIAG_DIR", None)
            else:
                os.environ["SPOP_DIAG_DIR"] = saved
            close_diagnostics(diag)


async def _demo(delay: float, diag: str) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    hub = Hub(HubConfig(host="127.0.0.1", port=0, http_port=0, diag_dir=diag))
    await hub.start()
    address = f"{hub.port}@127.0.0.1"
    console.print(f"[bold]spop demo[/bold]: hub on {address}, HTTP on 127.0.0.1:{hub.http_port}")
    scenarios = [load_scenario(name) for name in SCENARIOS]
    wanted = {(e["media"], e["resource"]) for s in scenarios for e in s.expect}
    expected = sum(len(s.expect) for s in scenarios) + 1  # + the direct `spop send` pop
    listeners: list[AsyncListener] = []
    received: list[ScreenPopEvent] = []
    done = asyncio.Event()

    def on_pop(event: ScreenPopEvent) -> None:
        received.append(event)
        _render(event, console)
        if len(received) >= expected:
            done.set()

    try:
        for media, resource in sorted(wanted):
            listener = AsyncListener(media, reconnecting_interval=1.0)
            listener.on_screen_pop(on_pop)
            await listener.initialize(address)
            await listener.start_listening(resource)
            listeners.append(listener)
            console.print(f"  listener {media:<9} {resource:<8} {listener.status}")
        for scenario in scenarios:
            await asyncio.sleep(delay)
            console.print(
                f"\n[bold cyan]scenario {scenario.name}[/bold cyan]: {scenario.description}"
            )
            await play(scenario, address)
        await asyncio.sleep(delay)
        console.print(
            "\n[bold cyan]spop send[/bold cyan] telephone 13579 --source 0612345678 --data ticket=T-42"
        )
        await client.publish(
            address,
            {
                "media": "telephone",
                "resource": "13579",
                "source": "0612345678",
                "contact_data": {"ticket": "T-42"},
            },
        )
        try:
            await asyncio.wait_for(done.wait(), timeout=10)
        except TimeoutError:
            pass
    finally:
        for listener in listeners:
            if listener.status is not ListenerStatus.Status_Down:
                await listener.shutdown()
        counters = hub.status()["counters"]
        await hub.stop()
    ok = len(received) == expected
    console.print(
        f"\n{len(received)}/{expected} pops delivered, {counters.get('acked', 0)} acknowledged;"
        " listeners shut down, hub stopped."
    )
    if not ok:
        print("spop demo: some pops did not arrive", file=sys.stderr)
    return 0 if ok else 1
