"""A small fake Asterisk Manager Interface for the tests: answers Login, Filter, CoreShowChannels
and QueueStatus as Asterisk 22 does, and replays recorded AMI events (the fixture's transcript)
to whoever logged in — paced or at once, split at random byte boundaries, filtered by the user's
read classes and by the filters the client added, as Asterisk would."""

from __future__ import annotations

import asyncio
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

BANNER = b"Asterisk Call Manager/11.0.0\r\n"
ALL_CLASSES = frozenset(
    [
        "system",
        "call",
        "log",
        "verbose",
        "command",
        "agent",
        "user",
        "config",
        "dtmf",
        "reporting",
        "cdr",
        "dialplan",
        "originate",
    ]
)


def fixture_dir() -> Path:
    """../shared/fixtures/asterisk beside the repository (CI), else the machine's copy."""
    repo = Path(__file__).resolve().parent.parent
    for candidate in (
        repo.parent / "shared" / "fixtures" / "asterisk",
        Path("/work/shared/fixtures/asterisk"),
    ):
        if (candidate / "transcript.ami").exists():
            return candidate
    raise FileNotFoundError(
        "the Asterisk fixture (shared/fixtures/asterisk/transcript.ami) is missing"
    )


def transcript_blocks() -> list[bytes]:
    """The recorded events, one AMI message each (CRLF CRLF included), banner and login answer cut."""
    raw = (fixture_dir() / "transcript.ami").read_bytes()
    raw = raw.split(b"\r\n", 1)[1]  # the banner line
    blocks = [b + b"\r\n\r\n" for b in raw.split(b"\r\n\r\n") if b.strip()]
    return [b for b in blocks if b.startswith(b"Event: ")]


def scenarios(blocks: list[bytes]) -> list[list[bytes]]:
    """The recording cut into its six calls (each block goes with the call it names, in order)."""
    calls: dict[str, list[bytes]] = {}
    order: list[str] = []
    current = ""
    for block in blocks:
        h = headers(block)
        linkedid = (
            h.get("Linkedid") or h.get("TransfereeLinkedid") or h.get("DestLinkedid") or current
        )
        if linkedid == "1796221507.32":  # the picker's own call belongs to scenario E
            linkedid = "1796221506.28"
        if linkedid not in calls:
            calls[linkedid] = []
            order.append(linkedid)
        calls[linkedid].append(block)
        current = linkedid
    return [calls[k] for k in order if len(calls[k]) > 20]


AGENT = re.compile(rb"(Local/[0-9a-z]+)@(agents|xfer)")


def relabel(block: bytes, copy: int, groups: int) -> bytes:
    """Copy n of a block: its Uniqueids/Linkedids and channel names made unique to the copy, and
    its agents those of group n % groups (`Local/100@agents` -> `Local/100g017@agents`: 100g017)."""
    block = block.replace(b"1796221", b"%07d" % (2_000_000 + copy)).replace(
        b"-0000", b"-%04x" % copy
    )
    return AGENT.sub(rb"\1g%03d@\2" % (copy % groups), block)


def wave(scenario: list[bytes], calls: int, groups: int = 100, first: int = 0) -> list[bytes]:
    """`calls` copies of one call, all in progress at once: copy i starts i/calls of a call's
    length after copy 0, so each moment mixes every step of the call (not 1,000 AgentCalled in a
    row), spread over `groups` teams of agents (a PBX does not ring one agent 1,000 times at once)."""
    length = len(scenario)
    order = sorted((j + i * length / calls, i, j) for i in range(calls) for j in range(length))
    return [relabel(scenario[j], first + i, groups) for _, i, j in order]


def busy_pbx(calls: int, groups: int = 100) -> list[bytes]:
    """The recording as `calls` copies of each of its six calls, each wave of copies in progress
    at once (benchmarks/asterisk_replay.py, the tests of a source's batches in flight)."""
    return [b for scenario in scenarios(transcript_blocks()) for b in wave(scenario, calls, groups)]


def headers(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\r\n"):
        key, sep, value = line.partition(": ")
        if sep and key not in out:
            out[key] = value
    return out


@dataclass
class Session:
    """What one client connection asked for."""

    writer: asyncio.StreamWriter
    filters: list[re.Pattern[str]] = field(default_factory=list)
    logged_in: asyncio.Event = field(default_factory=asyncio.Event)


class FakeAsterisk:
    """Run `await start()`; `port` is then set. `play(blocks, ...)` sends events to the session."""

    def __init__(
        self,
        username: str = "spop",
        secret: str = "spop-secret",
        read: frozenset[str] = ALL_CLASSES,
        allow_filter: bool = True,
        allow_channels: bool = True,
        list_delay: float = 0.0,
    ) -> None:
        self.list_delay = list_delay  # seconds before CoreShowChannels is answered (a busy PBX)
        self.username = username
        self.secret = secret
        self.read = read
        self.allow_filter = allow_filter
        self.allow_channels = allow_channels
        self.port = 0
        self.server: asyncio.base_events.Server | None = None
        self.sessions: list[Session] = []
        self.session_ready = asyncio.Event()
        self.logins: list[tuple[str, bool]] = []
        self.actions: list[str] = []
        # what Asterisk would list now: live channels and callers waiting, from the events played
        self.channels: dict[str, dict[str, str]] = {}
        self.waiting: dict[str, dict[str, str]] = {}

    def _list_channels(self, session: Session, action_id: str) -> None:
        self._answer(
            session,
            action_id,
            ["Response: Success", "EventList: start", "Message: Channels will follow"],
        )
        for channel in self.channels.values():
            lines = ["Event: CoreShowChannel"] + [
                f"{k}: {v}" for k, v in channel.items() if k != "Event"
            ]
            self._answer(session, action_id, lines)
        self._answer(
            session,
            action_id,
            [
                "Event: CoreShowChannelsComplete",
                "EventList: Complete",
                f"ListItems: {len(self.channels)}",
            ],
        )

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port or self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Asterisk going away: the listening socket and every session close."""
        for session in self.sessions:
            session.writer.close()
        self.sessions.clear()
        self.session_ready.clear()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def session(self, timeout: float = 10.0) -> Session:
        await asyncio.wait_for(self.session_ready.wait(), timeout)
        return self.sessions[-1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(writer)
        writer.write(BANNER)
        buffer = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                buffer += data
                while b"\r\n\r\n" in buffer:
                    block, buffer = buffer.split(b"\r\n\r\n", 1)
                    if not self._action(session, headers(block + b"\r\n")):
                        await writer.drain()
                        writer.close()
                        return
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if session in self.sessions:
                self.sessions.remove(session)

    def _answer(self, session: Session, action_id: str, lines: list[str]) -> None:
        body = "\r\n".join([lines[0], f"ActionID: {action_id}", *lines[1:]])
        session.writer.write((body + "\r\n\r\n").encode())

    def _action(self, session: Session, action: dict[str, str]) -> bool:
        name = action.get("Action", "")
        action_id = action.get("ActionID", "")
        self.actions.append(name)
        if name == "Login":
            ok = action.get("Username") == self.username and action.get("Secret") == self.secret
            self.logins.append((action.get("Username", ""), ok))
            if not ok:  # Asterisk answers, then drops the session
                self._answer(
                    session, action_id, ["Response: Error", "Message: Authentication failed"]
                )
                return False
            self._answer(
                session, action_id, ["Response: Success", "Message: Authentication accepted"]
            )
            self.sessions.append(session)
            session.logged_in.set()
            self.session_ready.set()
        elif not session.logged_in.is_set():
            self._answer(session, action_id, ["Response: Error", "Message: Permission denied"])
        elif name == "Filter":
            if not self.allow_filter:
                self._answer(session, action_id, ["Response: Error", "Message: Permission denied"])
            else:
                session.filters.append(re.compile(action.get("Filter", "")))
                self._answer(
                    session, action_id, ["Response: Success", "Message: Filter Added Successfully"]
                )
        elif name == "CoreShowChannels":
            if not self.allow_channels:
                self._answer(session, action_id, ["Response: Error", "Message: Permission denied"])
                return True
            if self.list_delay:
                asyncio.get_running_loop().call_later(
                    self.list_delay, self._list_channels, session, action_id
                )
            else:
                self._list_channels(session, action_id)
        elif name == "QueueStatus":
            self._answer(
                session,
                action_id,
                ["Response: Success", "EventList: start", "Message: Queue status will follow"],
            )
            for entry in self.waiting.values():
                lines = ["Event: QueueEntry"] + [f"{k}: {v}" for k, v in entry.items()]
                self._answer(session, action_id, lines)
            self._answer(
                session,
                action_id,
                [
                    "Event: QueueStatusComplete",
                    "EventList: Complete",
                    f"ListItems: {len(self.waiting)}",
                ],
            )
        else:
            self._answer(
                session, action_id, ["Response: Error", "Message: Invalid/unknown command"]
            )
        return True

    # -- the replay ------------------------------------------------------------------------------
    def _remember(self, block: bytes) -> None:
        event = headers(block)
        uid = event.get("Uniqueid")
        kind = event.get("Event")
        if uid and kind == "Newchannel":
            self.channels[uid] = {
                k: event[k]
                for k in (
                    "Channel",
                    "ChannelStateDesc",
                    "CallerIDNum",
                    "CallerIDName",
                    "Context",
                    "Exten",
                    "Uniqueid",
                    "Linkedid",
                )
                if k in event
            }
            self.channels[uid]["Application"] = ""
        elif uid and kind == "Hangup":
            self.channels.pop(uid, None)
        elif uid in self.channels:
            channel = self.channels[uid]
            for key in (
                "ChannelStateDesc",
                "Linkedid",
                "Context",
                "Exten",
                "CallerIDNum",
                "CallerIDName",
            ):
                if key in event:
                    channel[key] = event[key]
            if kind == "Newexten":
                channel["Application"] = event.get("Application", "")
        if kind == "QueueCallerJoin" and uid:
            self.waiting[uid] = {
                "Queue": event["Queue"],
                "Channel": event["Channel"],
                "Uniqueid": uid,
                "CallerIDNum": event.get("CallerIDNum", ""),
                "CallerIDName": event.get("CallerIDName", ""),
                "Wait": "0",
            }
        elif kind in ("QueueCallerLeave", "QueueCallerAbandon") and uid:
            self.waiting.pop(uid, None)

    def wanted(self, session: Session, block: bytes) -> bool:
        """Asterisk sends an event when the user may read one of its classes and a filter matches."""
        privilege = headers(block[:200]).get("Privilege", "")
        classes = {c for c in privilege.split(",") if c != "all"}
        if classes and not classes & self.read:
            return False
        if session.filters:
            text = block.decode("utf-8", "replace")
            return any(f.search(text) for f in session.filters)
        return True

    async def play(
        self,
        blocks: list[bytes],
        *,
        pace: float = 0.0,
        seed: int | None = None,
        max_piece: int = 4096,
        burst: int | None = None,
    ) -> int:
        """Send events to the newest session: `pace` seconds apart, or (0) at once in random pieces,
        or (`burst`) the first `burst` events in one write and then one event a turn of the loop:
        a busy PBX's backlog, then its stream as fast as the reader takes it.

        Returns the number of events written (after read-class and filter selection)."""
        session = await self.session()
        chosen = []
        for block in blocks:
            self._remember(block)
            if self.wanted(session, block):
                chosen.append(block)
        if pace:
            for block in chosen:
                session.writer.write(block)
                await session.writer.drain()
                await asyncio.sleep(pace)
            return len(chosen)
        if burst is not None:
            session.writer.write(b"".join(chosen[:burst]))
            for block in chosen[burst:]:
                await asyncio.sleep(0)
                session.writer.write(block)
            await session.writer.drain()
            return len(chosen)
        rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(4), "big"))
        data = b"".join(chosen)
        position = 0
        while position < len(data):
            size = rng.randint(1, max_piece)
            session.writer.write(data[position : position + size])
            await session.writer.drain()
            position += size
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        return len(chosen)

    def learn(self, blocks: list[bytes]) -> None:
        """Events that happened while nobody was connected: only the state changes."""
        for block in blocks:
            self._remember(block)
