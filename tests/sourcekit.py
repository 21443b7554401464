"""A real hub with one webhook source inside it (as `spop serve` runs it), real listeners, and
real HTTP requests to the source's path: what the twilio and webhook source tests share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from hubproc import LOOPBACK, until
from spop_cli.hub.server import Hub, HubConfig
from spop_cli.listener.core import AsyncListener
from spop_cli.plugins import get_plugin_manager, source_types
from spop_cli.sources import HubSink, make_source
from spop_cli.sources.runner import SourceRunner


@contextlib.asynccontextmanager
async def source_hub(name: str, table: dict[str, Any], **options: Any) -> AsyncIterator[Hub]:
    """A started hub on free loopback ports whose HTTP port serves the source `[sources.NAME]`."""
    source = make_source(source_types(get_plugin_manager()), name, table)
    config = {"host": LOOPBACK, "port": 0, "http_port": 0, "heartbeat": 1.0, **options}
    hub = Hub(HubConfig(**config))
    hub.sources = SourceRunner({name: source}, HubSink(hub), logging.getLogger(f"test.{name}"))
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


class Desk:
    """Listeners on a hub, one per (media, resource); every pop they get, as wire dicts."""

    def __init__(self, hub: Hub) -> None:
        self.address = f"{hub.port}@{LOOPBACK}"
        self.listeners: list[AsyncListener] = []
        self.keys: list[tuple[str, str]] = []
        self.pops: list[dict[str, Any]] = []

    async def listen(self, media: str, resource: str) -> None:
        listener = AsyncListener(media, reconnecting_interval=0.3)
        listener.on_screen_pop(lambda event: self.pops.append(event.to_dict()))
        await listener.initialize(self.address)
        await listener.start_listening(resource)
        self.listeners.append(listener)
        self.keys.append((media, resource))

    async def wait(self, count: int) -> list[dict[str, Any]]:
        assert await until(lambda: len(self.pops) >= count), self.pops
        return self.pops

    async def settled(self, hub: Hub, count: int) -> list[dict[str, Any]]:
        """Exactly `count` pops: a marker pop published after them proves none other is on its
        way (a listener gets its key's pops in order)."""
        await self.wait(count)
        for media, resource in self.keys:
            # every media carries queue_name (a callback has no source, say)
            await hub.publish({"media": media, "resource": resource, "queue_name": "marker"})
        await self.wait(count + len(self.keys))
        return [p for p in self.pops if p["queue_name"] != "marker"]

    async def close(self) -> None:
        for listener in self.listeners:
            await listener.shutdown()
        await asyncio.sleep(0)
