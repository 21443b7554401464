"""A small asyncio AMI client: connect, log in, send actions and collect their answers, hand every
event to a callback in the order Asterisk sent it. Framing is `ami_parser`; call logic is elsewhere.

Our own rather than panoramisk: the protocol needs ~150 lines here, panoramisk 1.4 (last release
2021) drops the connection on a "…successfully queued" reply without `Async` (KeyError), and
reading events in order through one callback, with no per-event task, is what keeps 10,000+
events/s on one core.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from .ami_parser import AmiParser, encode_action

DEFAULT_PORT = 5038
READ_CHUNK = 1 << 16


class AmiError(Exception):
    """The AMI link cannot be used as configured; the message names the fix."""


class AmiAuthError(AmiError):
    """Asterisk refused the login (wrong user or secret, or a host not permitted)."""


class AmiPermissionError(AmiError):
    """The AMI user may not run an action spop needs."""


def login_fix(username: str) -> str:
    return (
        f"check secret= in the [{username}] section of Asterisk's manager.conf (and that permit= "
        f"allows this host), and the secret spop uses ([sources.NAME] secret or "
        f"SPOP_ASTERISK_SECRET); then `asterisk -rx 'manager reload'`"
    )


class AmiConnection:
    """One AMI session. `on_event(message)` is called for each event, in stream order."""

    def __init__(
        self,
        on_event: Callable[[dict[str, str]], None],
        log: logging.Logger | None = None,
    ) -> None:
        self.on_event = on_event
        self.log = log or logging.getLogger("spop.source.ami")
        self.parser = AmiParser()
        self.banner = ""
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[asyncio.Future[Any], list[dict[str, str]]]] = {}
        self._abandoned: set[str] = set()  # actions not answered in time: their late answers
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self.closed: asyncio.Future[Exception | None] | None = None

    async def connect(self, host: str, port: int = DEFAULT_PORT, timeout: float = 10.0) -> str:
        """Open the TCP link and read Asterisk's banner line; returns it."""
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        self._writer = writer
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line.startswith(b"Asterisk Call Manager/"):
            writer.close()
            raise AmiError(
                f"{host}:{port} is not an Asterisk Manager Interface (it said {line[:60]!r})"
            )
        self.banner = line.decode("utf-8", "replace").strip()
        self.parser.banner = self.banner
        self.closed = loop.create_future()
        self._reader_task = loop.create_task(self._read(reader))
        return self.banner

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error: Exception | None = None
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                self.dispatch(self.parser.feed(data))
                for bad in self.parser.take_malformed():
                    self.log.warning("AMI: %s, skipped: %r", bad.reason, bad.line)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a reset, or a bug in a callback: the link is gone either way
            error = exc
            if not isinstance(exc, OSError):
                self.log.exception("AMI: reading the stream failed")
        finally:
            lost = ConnectionError("Asterisk closed the AMI connection")
            for future, _ in self._pending.values():
                if not future.done():
                    future.set_exception(lost)
            self._pending.clear()
            if self.closed is not None and not self.closed.done():
                self.closed.set_result(error)

    def dispatch(self, messages: list[dict[str, str]]) -> None:
        """Answers go to the action waiting for them; events to `on_event`, in order."""
        for message in messages:
            action_id = message.get("ActionID")
            waiting = self._pending.get(action_id) if action_id else None
            if waiting is None:
                if action_id and action_id in self._abandoned:
                    if (
                        message.get("EventList") == "Complete"
                        or "Response" in message
                        and (message.get("EventList") != "start")
                    ):
                        self._abandoned.discard(action_id)
                elif "Event" in message:
                    self.on_event(message)
                continue
            future, items = waiting
            if "Response" in message:
                if message.get("Response") != "Success" or message.get("EventList") != "start":
                    self._pending.pop(action_id or "", None)
                    if not future.done():
                        future.set_result((message, items))
                else:
                    items.append(message)  # the list's events follow, then its Complete event
            elif message.get("EventList") == "Complete":
                self._pending.pop(action_id or "", None)
                if not future.done():
                    future.set_result((items[0] if items else {}, items[1:]))
            else:
                items.append(message)

    async def action(
        self, name: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0
    ) -> tuple[dict[str, str], list[dict[str, str]]]:
        """Send an action; its response and, for list actions, the events listed."""
        if self._writer is None:
            raise AmiError("not connected")
        action_id = f"spop-{next(self._ids)}"
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = (future, [])
        self._writer.write(encode_action(name, {"ActionID": action_id, **(headers or {})}))
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            if self._pending.pop(action_id, None) is not None:  # given up: its answer, if it
                self._abandoned.add(action_id)  # comes, is no event of the stream

    async def login(
        self, username: str, secret: str, events: str = "on", timeout: float = 10.0
    ) -> None:
        """Log in; a refusal raises AmiAuthError naming the fix (the secret is never logged)."""
        answer, _ = await self.action(
            "Login", {"Username": username, "Secret": secret, "Events": events}, timeout
        )
        if answer.get("Response") != "Success":
            said = answer.get("Message", "refused")
            raise AmiAuthError(
                f"Asterisk refused the login of AMI user {username!r} ({said}): {login_fix(username)}"
            )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def wait_closed(self) -> Exception | None:
        assert self.closed is not None
        return await self.closed
