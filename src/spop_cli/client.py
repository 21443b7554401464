"""The client side of the listener port: connect, handshake, requests, heartbeats.

Used by listeners (register, pops, acks) and by sources (`spop send`, `spop simulate`, status).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections.abc import Callable
from typing import Any

from .address import Address, parse_addresses
from .model import Error, ScreenPopError, new_pop_id
from .protocol import HEARTBEAT, MAX_FRAME, VERSION, FrameDecoder, FrameError, ack_frames, encode

PING = encode({"op": "ping"})
PONG = encode({"op": "pong"})


class Rejected(ScreenPopError):
    """The hub refused a pop or contact event; `detail` names the error, field and index."""

    def __init__(self, code: Error, message: str, detail: dict[str, Any]) -> None:
        super().__init__(code, message)
        self.detail = detail


class HubLink(asyncio.Protocol):
    """One connection to a hub. Unsolicited frames (pops) go to `on_pop`; loss to `on_lost`."""

    def __init__(
        self,
        on_pop: Callable[[dict[str, Any]], None] | None = None,
        on_lost: Callable[[Exception | None], None] | None = None,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.on_pop = on_pop
        self.on_lost = on_lost
        self.on_change = on_change  # contact updates, when the hello asked for them
        # called once after the frames of one read were handled (the listener sends its acks
        # there: in the loop turn the pops were handled in, not one later)
        self.on_read_done: Callable[[], None] | None = None
        self.updates = False  # the hub agreed to send them (protocol 2)
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(1 << 24)  # trust the hub's frames up to 16 MB (status)
        self._refs = itertools.count(1)
        self._waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._closed = asyncio.get_running_loop().create_future()
        self.heartbeat = HEARTBEAT
        # what the hub announced in `welcome`: the largest frame it reads, how long it keeps a pop
        self.max_frame = MAX_FRAME
        self.pop_ttl: float | None = None
        self.max_registrations: int | None = None  # per connection, when the hub says
        self.last_rx = self.last_tx = time.monotonic()
        self._beat: asyncio.Task[None] | None = None
        self.lost = False
        # the hub's fatal error that ended the link (an error frame with no request of ours:
        # "hub at its connection limit" arrives before our hello is answered): what a request
        # on this link raises from then on, rather than "not connected" or "connection lost"
        self.error: ScreenPopError | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        try:
            frames = self.decoder.feed(data)
        except FrameError as exc:
            self._fail(
                ScreenPopError(
                    Error.SCREENPOP_Framework_Error, f"hub sent a bad frame: {exc.message}"
                )
            )
            return
        try:
            for frame in frames:
                op = frame["op"]
                if op == "pop":
                    if self.on_pop is not None:
                        self.on_pop(frame.get("pop") or {})
                elif op == "change":
                    if self.on_change is not None:
                        self.on_change(frame.get("change") or {})
                elif op == "ping":
                    self.send(PONG)
                elif op in ("ok", "welcome", "error"):
                    future = self._waiting.pop(frame.get("ref"), None)
                    if future is not None and not future.done():
                        future.set_result(frame)
                    elif op == "error":
                        self.error = ScreenPopError(_code(frame), frame.get("message", ""))
                        self._fail(self.error)
        finally:
            if self.on_read_done is not None:
                self.on_read_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._beat is not None:
            self._beat.cancel()
        why = f": {exc}" if isinstance(exc, ssl.SSLError) else ""  # a certificate refused, say
        error = self.error or ScreenPopError(
            Error.SCREENPOP_Cannot_Find_HiPath_ProCenter, f"connection to the hub lost{why}"
        )
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        self._waiting.clear()
        if not self._closed.done():
            self._closed.set_result(None)
        if self.on_lost is not None:
            self.on_lost(exc)

    # -- out ------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        # is_closing(): after a reset the transport is closed before connection_lost runs
        if self.transport is not None and not self.lost and not self.transport.is_closing():
            self.transport.write(data)
            self.last_tx = time.monotonic()

    def send_acks(self, ids: list[str]) -> None:
        """As few `ack` frames as fit the hub's max_frame: one over it would close the
        connection, and none of its acks would count."""
        for frame in ack_frames(ids, self.max_frame):
            self.send(frame)

    async def goodbye(self, timeout: float) -> None:
        """`bye`, then close: the hub logs a clean goodbye rather than a lost connection."""
        self.on_lost = None
        if not self.lost:
            try:
                await self.request("bye", timeout=timeout)
            except ScreenPopError:
                pass
        self.close()

    async def request(self, op: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Send a frame with a fresh `ref`; return the `ok`/`welcome` answer or raise its error."""
        if self.error is not None:
            raise self.error
        if self.lost:
            raise not_connected()
        ref = next(self._refs)
        data = encode({"op": op, "ref": ref, **fields})
        if len(data) - 1 > self.max_frame:  # the hub would close the connection on it
            items = fields.get("pops", fields.get("events"))
            what = "pops" if "pops" in fields else "events"
            fix = (
                f"send fewer {what} at once"
                if isinstance(items, list) and len(items) > 1
                else "make it smaller: its contact_data, say"
            )
            raise ScreenPopError(
                Error.SCREENPOP_Framework_Error,
                f"{op!r} frame of {len(data) - 1} bytes is over the hub's max_frame of "
                f"{self.max_frame} bytes ({fix})",
            )
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ref] = future
        self.send(data)
        try:
            answer = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._waiting.pop(ref, None)
            raise ScreenPopError(
                Error.SCREENPOP_Cannot_Find_HiPath_ProCenter,
                f"no answer from the hub to {op!r} in {timeout:g} s",
            ) from None
        if answer["op"] == "error":
            if "detail" in answer:  # the hub checked our input and refused it
                raise Rejected(_code(answer), answer.get("message", ""), answer["detail"])
            raise ScreenPopError(_code(answer), answer.get("message", ""))
        return answer

    def _fail(self, error: ScreenPopError) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        self._waiting.clear()
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort() if self.lost else self.transport.close()

    async def wait_closed(self) -> None:
        await self._closed

    def start_heartbeat(self, interval: float) -> None:
        self.heartbeat = interval
        self._beat = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        """Ping when idle; a hub silent for three intervals is dead: abort, so we reconnect."""
        while not self.lost:
            await asyncio.sleep(self.heartbeat / 2)
            now = time.monotonic()
            if now - self.last_rx > 3 * self.heartbeat:
                if self.transport is not None:
                    self.transport.abort()
                return
            if now - self.last_tx > self.heartbeat:
                self.send(PING)


def not_connected() -> ScreenPopError:
    return ScreenPopError(Error.SCREENPOP_Cannot_Find_HiPath_ProCenter, "not connected")


def _code(frame: dict[str, Any]) -> Error:
    try:
        return Error(frame.get("code"))
    except ValueError:
        return Error.SCREENPOP_Framework_Error


async def connect(
    address: str | Address,
    *,
    token: str | None = None,
    role: str = "listener",
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
    on_pop: Callable[[dict[str, Any]], None] | None = None,
    on_lost: Callable[[Exception | None], None] | None = None,
    on_change: Callable[[dict[str, Any]], None] | None = None,
) -> HubLink:
    """Connect and shake hands. Unreachable → Cannot_Find_HiPath_ProCenter; refused → the hub's code.

    A list (`6000@a,6000@b`) names the hubs of a cluster: each is tried in turn until one answers;
    only when none can be reached is the last failure raised (a refusal is raised at once)."""
    addrs = parse_addresses(address) if isinstance(address, str) else [address]
    for index, addr in enumerate(addrs):
        try:
            return await _connect_one(
                addr, token, role, timeout, ssl_context, on_pop, on_lost, on_change
            )
        except ScreenPopError as exc:
            if (
                exc.code is not Error.SCREENPOP_Cannot_Find_HiPath_ProCenter
                or index == len(addrs) - 1
            ):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


async def _connect_one(
    addr: Address,
    token: str | None,
    role: str,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    on_pop: Callable[[dict[str, Any]], None] | None,
    on_lost: Callable[[Exception | None], None] | None,
    on_change: Callable[[dict[str, Any]], None] | None = None,
) -> HubLink:
    loop = asyncio.get_running_loop()
    try:
        _, link = await asyncio.wait_for(
            loop.create_connection(
                lambda: HubLink(on_pop, on_lost, on_change),
                addr.host,
                addr.port,
                ssl=ssl_context,
                server_hostname=addr.host if ssl_context else None,
            ),
            timeout,
        )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise ScreenPopError(
            Error.SCREENPOP_Cannot_Find_HiPath_ProCenter,
            f"cannot reach the hub at {addr}: {str(exc) or 'no answer in time'}",
        ) from None
    # protocol 1 unless we want contact updates: a client that does not is what it always was
    hello: dict[str, Any] = {"version": 1, "role": role, "client": "spop-python"}
    if on_change is not None:
        hello.update(version=VERSION, updates=True)
    if token:
        hello["token"] = token
    try:
        welcome = await link.request("hello", timeout=timeout, **hello)
    except ScreenPopError as exc:
        link.on_lost = None
        link.close()
        if (
            link.lost
            and link.error is None
            and exc.code is Error.SCREENPOP_Cannot_Find_HiPath_ProCenter
        ):
            raise ScreenPopError(  # it accepted the connection, then closed it unanswered
                exc.code,
                f"the hub at {addr} closed the connection before answering hello "
                f"({exc.message}): a TLS port reached without TLS, or not a spop hub",
            ) from None
        if on_change is not None and "not supported" in exc.message:
            # a hub older than contact updates: speak protocol 1 to it, without them
            return await _connect_one(addr, token, role, timeout, ssl_context, on_pop, on_lost)
        raise
    except BaseException:  # refused, timed out, or cancelled: never leave the socket open
        link.on_lost = None
        link.close()
        raise
    link.updates = welcome.get("updates") is True
    link.max_frame = _positive(welcome.get("max_frame"), MAX_FRAME)
    ttl = welcome.get("pop_ttl")
    link.pop_ttl = float(ttl) if isinstance(ttl, int | float) and ttl > 0 else None
    if "max_registrations" in welcome:  # an older hub does not say: its default was 10,000
        link.max_registrations = _positive(welcome.get("max_registrations"), 10_000)
    link.start_heartbeat(float(welcome.get("heartbeat") or HEARTBEAT))
    return link


def _positive(value: Any, default: int) -> int:
    """A whole number the hub announced, or the default when it sent none (or nonsense)."""
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
    )


async def publish(
    address: str, pops: list[dict[str, Any]] | dict[str, Any], **options: Any
) -> list[str]:
    """Send pops as a source; return their ids once the hub has accepted (and journalled) them.
    To a list of hubs, a pop without an id gets one here: sent again to the next hub, it is a
    duplicate there, not a second pop."""
    if isinstance(address, str) and len(parse_addresses(address)) > 1:
        pops = _with_ids(pops)
    answer = await _as_source(address, "publish", {"pops": pops}, options)
    return list(answer.get("ids", []))


async def send_contacts(
    address: str, events: list[dict[str, Any]], origin: str | None = None, **options: Any
) -> dict[str, Any]:
    """Send lifecycle events as a source; return what the hub applied (and the pops it made).
    To a list of hubs, an event without an id gets one here (as pops do in `publish`).
    `origin`: the source's name, kept with the contacts the events start (`open_contacts`)."""
    if isinstance(address, str) and len(parse_addresses(address)) > 1:
        events = _with_ids(events)
    fields: dict[str, Any] = {"events": events}
    if origin is not None:
        fields["origin"] = origin
    answer = await _as_source(address, "contact", fields, options)
    return {"applied": answer.get("applied", 0), "pops": answer.get("pops", [])}


async def open_contacts(address: str, origin: str, **options: Any) -> list[dict[str, Any]]:
    """The hub's contacts not ended that the source `origin` started (sent with that
    `origin`): what a source restarted goes on with, so that nobody is popped twice."""
    answer = await _as_source(address, "open_contacts", {"origin": origin}, options)
    return list(answer.get("contacts", []))


def _with_ids(pops: list[dict[str, Any]] | dict[str, Any]) -> Any:
    """Pops (or contact events) each with an id: those without get a fresh one."""

    def one(pop: Any) -> Any:
        if isinstance(pop, dict) and pop.get("id") is None:
            return {**pop, "id": new_pop_id()}
        return pop

    return [one(pop) for pop in pops] if isinstance(pops, list) else one(pops)


async def _as_source(
    address: str | Address, op: str, fields: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """One request as a source. With a list of hubs (a cluster), the next hub is tried when one
    cannot be reached or answers `journal_unavailable` (its link to NATS is down, say: nothing
    was accepted, or a resend with the same ids is a duplicate); any other answer is final."""
    addrs = parse_addresses(address) if isinstance(address, str) else [address]
    for index, addr in enumerate(addrs):
        last = index == len(addrs) - 1
        try:
            link = await connect(addr, role="source", **options)
        except ScreenPopError as exc:
            if exc.code is not Error.SCREENPOP_Cannot_Find_HiPath_ProCenter or last:
                raise
            continue
        try:
            return await link.request(op, timeout=options.get("timeout", 10.0), **fields)
        except Rejected as exc:
            if last or not isinstance(exc.detail, dict):
                raise
            if exc.detail.get("error") != "journal_unavailable":
                raise
        finally:
            link.close()
    raise AssertionError("unreachable")  # pragma: no cover


async def fetch_status_async(address: str, **options: Any) -> dict[str, Any]:
    link = await connect(address, role="status", **options)
    try:
        return (await link.request("status", timeout=options.get("timeout", 10.0)))["status"]
    finally:
        link.close()


def fetch_status(
    address: str, token: str | None = None, timeout: float = 5.0, **options: Any
) -> dict[str, Any]:
    """The hub's status (listeners, counters), for `spop status`."""
    return asyncio.run(fetch_status_async(address, token=token, timeout=timeout, **options))
