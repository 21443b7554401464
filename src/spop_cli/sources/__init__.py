"""Sources: what turns an outside system's events (a PBX, a cloud routing engine's webhooks) into
the contact lifecycle events of `POST /v1/contacts`.

A source type is registered by a plugin through the `register_sources(register)` hook, exactly as
actions are; the built-ins (`asterisk`, `twilio`, `webhook`) register through the same hook. A
source runs either inside `spop serve` (its sink applies events in the hub's own process) or
standalone with `spop source NAME` (its sink is a connection to a hub, like `spop simulate`).

A `Source` does one or both of:
- `run(ctx)`: a long-lived task that connects to the outside system (Asterisk's AMI) and sends
  events with `await ctx.sink.send([...])`; it reconnects by itself and returns only when cancelled.
- `routes(ctx)`: aiohttp routes the outside system calls (webhooks); served on the hub's HTTP port
  inside `spop serve`, or on the source's own `listen` address standalone.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "ContactSink",
    "HubSink",
    "RemoteSink",
    "Source",
    "SourceContext",
    "SourceError",
    "configured_sources",
    "make_source",
]


class SourceError(Exception):
    """A source's configuration or link that cannot be used; the message names the key or the fix."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ContactSink(Protocol):
    """Where a source's lifecycle events go: the hub, in process or over its listener port."""

    async def send(
        self, events: list[dict[str, Any]], *, origin: str | None = None
    ) -> dict[str, Any]:
        """Apply events in order (bodies as for `POST /v1/contacts`); return `{"applied", "pops"}`
        once the hub has committed them. A refusal raises (`ContactEventError` in process,
        `client.Rejected` remote) with the error code, field and index. `origin`: the source's
        name, which the hub keeps with the contacts the events start (`open_contacts`)."""
        ...

    async def open_contacts(self, origin: str) -> list[dict[str, Any]]:
        """The hub's contacts not ended that the source `origin` started (`source_view` of
        each): what a restarted source goes on with."""
        ...


@dataclass
class SourceContext:
    """What a running source is given: where to send events, where to log, its config name."""

    sink: ContactSink
    log: logging.Logger
    name: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)


class Source:
    """One configured source. Subclasses override `run`, `routes`, or both, and `check`."""

    async def run(self, ctx: SourceContext) -> None:
        """Connect to the outside system and send events until cancelled. Default: nothing to run."""
        await ctx.stop.wait()

    def routes(self, ctx: SourceContext) -> list[Any]:
        """aiohttp `RouteDef`s for webhooks this source receives. Default: none."""
        return []

    async def check(self, ctx: SourceContext, out: Callable[[str], None]) -> bool:
        """`spop source NAME --check`: try the link, say what is seen through `out`, True if it works."""
        out(f"{ctx.name}: this source has no check of its own; its configuration is valid")
        return True


# -- sinks -----------------------------------------------------------------------------------------
class HubSink:
    """Inside `spop serve`: events go straight to the hub's contact tracking (same commit rules)."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub

    async def send(
        self,
        events: list[dict[str, Any]],
        *,
        skip_refused: bool = False,
        origin: str | None = None,
    ) -> dict[str, Any]:
        """`skip_refused`: a refused event is skipped and the ones after it are applied at once,
        in order; the answer's `refused` lists the refusals (`ContactEventError`, `index` in
        `events`). For a source with batches in flight: sent again, they would come after those."""
        return await self.hub.apply_contacts(events, skip_refused=skip_refused, origin=origin)

    async def open_contacts(self, origin: str) -> list[dict[str, Any]]:
        """The hub's open contacts that the source `origin` started (`Hub.open_contacts`):
        after a restart of the hub, what this source was following."""
        return await self.hub.open_contacts(origin)


class RemoteSink:
    """Standalone: one source connection to a hub, reconnected with backoff when it drops.

    An event batch whose answer was lost with the connection is sent again on the new one (at least
    once): sources give their events an `id` so the hub applies a resend once.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        retry_for: float = 60.0,
        log: logging.Logger | None = None,
    ) -> None:
        self.address = address
        self.token = token
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.retry_for = retry_for
        self.log = log or logging.getLogger("spop.source")
        self._link: Any = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> Any:
        from ..client import connect

        if self._link is None or self._link.lost:
            self._link = await connect(
                self.address,
                token=self.token,
                role="source",
                timeout=self.timeout,
                ssl_context=self.ssl_context,
            )
        return self._link

    async def send(
        self, events: list[dict[str, Any]], *, origin: str | None = None
    ) -> dict[str, Any]:
        """`origin`: this source's name, kept by the hub with the contacts the events start
        (`open_contacts`)."""
        fields: dict[str, Any] = {"events": events}
        if origin is not None:
            fields["origin"] = origin
        answer = await self._request("contact", fields)
        return {"applied": answer.get("applied", 0), "pops": answer.get("pops", [])}

    async def open_contacts(self, origin: str) -> list[dict[str, Any]]:
        """The hub's open contacts that this source (`origin`) started: after a restart of this
        process, what it was following (`open_contacts` in docs/protocol.md)."""
        answer = await self._request("open_contacts", {"origin": origin}, retry_for=0.0)
        contacts = answer.get("contacts")
        return [c for c in contacts if isinstance(c, dict)] if isinstance(contacts, list) else []

    async def _request(
        self, op: str, fields: dict[str, Any], retry_for: float | None = None
    ) -> dict[str, Any]:
        from ..client import Rejected
        from ..model import Error, ScreenPopError

        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.retry_for if retry_for is None else retry_for)
        delay = 0.2
        async with self._lock:  # one batch at a time keeps each contact's events in order
            while True:
                try:
                    link = await self._connected()
                    return await link.request(op, timeout=self.timeout, **fields)
                except Rejected:
                    raise
                except ScreenPopError as exc:
                    if exc.code is not Error.SCREENPOP_Cannot_Find_HiPath_ProCenter:
                        raise
                    if loop.time() + delay > deadline:
                        raise
                    self.log.warning(
                        "hub %s: %s; retrying in %.1f s", self.address, exc.message, delay
                    )
                    await asyncio.sleep(delay * (0.5 + random.random() / 2))
                    delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None


# -- configuration ---------------------------------------------------------------------------------
#: keys of a `[sources.NAME]` table that spop reads itself; the rest go to the source's factory
FRAMEWORK_KEYS = ("type", "enabled", "listen")


def configured_sources(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The `[sources.NAME]` tables of a config document, each with its `type` (default: NAME)."""
    tables = doc.get("sources", {})
    if not isinstance(tables, Mapping):
        return {}
    return {
        name: {"type": name, **table}
        for name, table in tables.items()
        if isinstance(table, Mapping)
    }


def make_source(types: Mapping[str, Any], name: str, table: Mapping[str, Any]) -> Source:
    """Build the source `[sources.NAME]` describes; SourceError names the key at fault."""
    kind = table.get("type", name)
    if kind not in types:
        known = ", ".join(sorted(types)) or "none installed"
        raise SourceError(f"unknown source type {kind!r} (installed: {known})", "type")
    options = {k: v for k, v in table.items() if k not in FRAMEWORK_KEYS}
    return types[kind].factory(options)
