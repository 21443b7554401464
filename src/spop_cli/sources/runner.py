"""Runs configured sources beside a hub or standalone: one task each, restarted when it fails."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from . import ContactSink, Source, SourceContext


class SourceRunner:
    """Keeps every configured source's `run` task alive and gathers their webhook routes."""

    def __init__(
        self,
        sources: dict[str, Source],
        sink: ContactSink,
        log: logging.Logger,
        max_backoff: float = 30.0,
    ) -> None:
        self.sources = sources
        self.log = log
        self.max_backoff = max_backoff
        self.contexts = {name: SourceContext(sink, log.getChild(name), name) for name in sources}
        self._tasks: list[asyncio.Task[None]] = []

    def routes(self) -> list[Any]:
        return [
            route
            for name, source in self.sources.items()
            for route in source.routes(self.contexts[name])
        ]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for name, source in self.sources.items():
            self._tasks.append(loop.create_task(self._keep(name, source), name=f"source {name}"))
            self.log.info("source %s started (%s)", name, type(source).__name__)

    async def _keep(self, name: str, source: Source) -> None:
        """A source whose task fails is logged and started again, backing off up to max_backoff."""
        ctx = self.contexts[name]
        delay = 1.0
        while not ctx.stop.is_set():
            try:
                await source.run(ctx)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("source %s failed; starting it again in %.0f s", name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)

    async def stop(self) -> None:
        for ctx in self.contexts.values():
            ctx.stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
