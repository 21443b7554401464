"""A plain aiohttp client of the browser endpoints: sign in, open a stream, read its events, ack."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass
class Event:
    event: str
    id: str | None
    data: str

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class Stream:
    """One open SSE response, its events parsed as they come."""

    response: aiohttp.ClientResponse
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None

    def start(self) -> Stream:
        self.task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        name, ident, data = "message", None, []
        async for raw in self.response.content:
            line = raw.decode().rstrip("\n").rstrip("\r")
            if not line:
                if data:
                    await self.events.put(Event(name, ident, "\n".join(data)))
                name, ident, data = "message", None, []
            elif line.startswith(":"):
                continue
            else:
                key, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if key == "event":
                    name = value
                elif key == "id":
                    ident = value
                elif key == "data":
                    data.append(value)

    async def next(
        self, kinds: tuple[str, ...] = ("pop", "change"), timeout: float = 10.0
    ) -> Event:
        """The next event of one of `kinds` (others, such as pings, are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if event.event in kinds:
                    return event

    async def quiet(
        self, seconds: float, kinds: tuple[str, ...] = ("pop", "change")
    ) -> list[Event]:
        """Events of `kinds` arriving within `seconds` (none expected, usually)."""
        got: list[Event] = []
        try:
            async with asyncio.timeout(seconds):
                while True:
                    event = await self.events.get()
                    if event.event in kinds:
                        got.append(event)
        except TimeoutError:
            pass
        return got

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, aiohttp.ClientError):
                pass
        self.response.close()


class BrowserClient:
    """What a page does: one cookie jar, a CSRF token, streams and acks."""

    def __init__(self, base: str, origin: str | None = None, ssl: Any = None) -> None:
        self.base = base
        self.origin = origin
        jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
        self.session = aiohttp.ClientSession(
            cookie_jar=jar,
            timeout=aiohttp.ClientTimeout(total=None),
            connector=aiohttp.TCPConnector(ssl=ssl) if ssl is not None else None,
        )
        self.csrf = ""

    def headers(self, **extra: str) -> dict[str, str]:
        headers = dict(extra)
        if self.origin is not None:
            headers["Origin"] = self.origin
        return headers

    async def login(self, token: str | None) -> aiohttp.ClientResponse:
        response = await self.session.post(
            f"{self.base}/v1/browser/session", json={"token": token}, headers=self.headers()
        )
        if response.status == 200:
            self.csrf = (await response.json())["csrf"]
        return response

    async def stream(
        self, media: str, resources: list[str], last_event_id: str | None = None
    ) -> Stream:
        params = [("media", media), *[("resource", r) for r in resources]]
        headers = self.headers(Accept="text/event-stream")
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        response = await self.session.get(
            f"{self.base}/v1/browser/stream", params=params, headers=headers
        )
        stream = Stream(response)
        if response.status == 200:
            stream.start()
        return stream

    async def ack(
        self, media: str, resources: list[str], ids: list[str], csrf: str | None = None
    ) -> aiohttp.ClientResponse:
        headers = self.headers()
        token = self.csrf if csrf is None else csrf
        if token:
            headers["X-Spop-CSRF"] = token
        return await self.session.post(
            f"{self.base}/v1/browser/ack",
            json={"media": media, "resource": resources, "ids": ids},
            headers=headers,
        )

    async def close(self) -> None:
        await self.session.close()
