"""The Asterisk Manager Interface's framing: `Key: Value` lines ending with CRLF, a blank line ending
each message. Pure (bytes in, dicts out), so it is fuzzed without a socket.

Asterisk sends one banner line first (`Asterisk Call Manager/11.0.0`), then messages. A message is
an event (`Event: Newchannel`) or an action's answer (`Response: Success`, with its `ActionID`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: a message (or the banner) longer than this without its blank line is dropped, not buffered
MAX_MESSAGE = 1 << 20

BANNER_PREFIX = b"Asterisk Call Manager/"


@dataclass
class Malformed:
    """A line that is not `Key: Value`, or a message cut for being too long: logged, then skipped."""

    reason: str
    line: bytes


@dataclass
class AmiParser:
    """Feed it bytes as they come (split anywhere); it returns whole messages, in order.

    A message is a dict of its headers, names as Asterisk spells them; a header that repeats (e.g.
    `ChanVariable` on some events) keeps its first value, later ones go under `Name#2`, `Name#3`...
    """

    banner: str | None = None
    malformed: list[Malformed] = field(default_factory=list)
    _buffer: bytes = b""
    _skipping: bool = False  # inside a message too long to keep: drop until its blank line

    def feed(self, data: bytes) -> list[dict[str, str]]:
        buffer = self._buffer + data if self._buffer else data
        messages: list[dict[str, str]] = []
        if self.banner is None:
            end = buffer.find(b"\n")
            if end < 0:
                self._buffer = self._cut(buffer)
                return messages
            line = buffer[:end].rstrip(b"\r")
            if line.startswith(BANNER_PREFIX):
                self.banner = line.decode("utf-8", "replace")
                buffer = buffer[end + 1 :]
            else:
                self.banner = ""  # no banner (a proxy, a replay): parse messages straight away
        start = 0
        while True:
            end = buffer.find(b"\r\n\r\n", start)
            if end < 0:
                break
            block = buffer[start:end]
            start = end + 4
            if self._skipping:
                self._skipping = False
                continue
            message = self._message(block)
            if message:
                messages.append(message)
        self._buffer = self._cut(buffer[start:])
        return messages

    def _cut(self, rest: bytes) -> bytes:
        """Keep an unfinished message, unless it is already over MAX_MESSAGE: then skip it whole."""
        if len(rest) <= MAX_MESSAGE:
            return rest
        if not self._skipping:
            self.malformed.append(
                Malformed(f"message over {MAX_MESSAGE} bytes dropped", rest[:200])
            )
        self._skipping = True
        # keep the last 3 bytes: the end of the message (CRLF CRLF) may straddle this read
        return rest[-3:]

    def _message(self, block: bytes) -> dict[str, str]:
        message: dict[str, str] = {}
        # one decode per message, not two per line: this loop is most of the source's CPU
        for raw in block.decode("utf-8", "replace").split("\r\n"):
            key, sep, value = raw.partition(":")
            if not sep or not key or key[0] == " " or key[-1] == " " or "\n" in raw:
                if raw.strip():
                    line = raw.encode("utf-8", "replace")[:200]
                    self.malformed.append(Malformed("not a 'Key: Value' line", line))
                continue
            if value[:1] == " ":
                value = value[1:]
            if key in message:
                n = 2
                while f"{key}#{n}" in message:
                    n += 1
                key = f"{key}#{n}"
            message[key] = value
        return message

    def take_malformed(self) -> list[Malformed]:
        """The malformed lines met since the last call (the reader logs them)."""
        found, self.malformed = self.malformed, []
        return found


def encode_action(action: str, headers: dict[str, str]) -> bytes:
    """One action as Asterisk reads it; CR and LF in a value would start a new header, so they go."""
    lines = [f"Action: {action}"]
    for key, value in headers.items():
        clean = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{key}: {clean}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
