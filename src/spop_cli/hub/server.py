"""The hub's lifecycle: start both ports, sweep, heartbeat, stop. Accepting pops lives here too."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ..model import Error
from ..pops import InputError, normalize_pops
from ..protocol import HEARTBEAT, MAX_FRAME, encode
from .connection import PING, HubConnection
from .delivery import InProcessDelivery


@dataclass
class HubConfig:
    """Every option of `spop serve`, with its default."""

    host: str = "127.0.0.1"
    port: int = 6000
    http_port: int | None = 6080  # None: no HTTP port
    token: str | None = None  # listeners (and sources, unless source_token is set)
    source_token: str | None = None  # may publish; desktops holding `token` then may not
    journal: str | None = None  # SQLite path; None: memory only
    pop_ttl: float = 120.0
    dedupe_window: float = 120.0
    heartbeat: float = HEARTBEAT
    handshake_timeout: float = 10.0
    max_frame: int = MAX_FRAME
    max_buffer: int = 1024 * 1024  # per-connection write buffer before a slow consumer is dropped
    max_connections: int = 50_000
    max_registrations: int = 10_000  # per connection
    max_body: int = 1024 * 1024  # HTTP request body
    http_idle_timeout: float = 30.0  # an HTTP connection without a complete request head is closed
    http_body_timeout: float = 30.0  # time to receive a request body once its head is in
    contact_forget_after: float = 300.0
    contact_idle_expiry: float = 4 * 3600.0
    tls_cert: str | None = None
    tls_key: str | None = None
    diag_dir: str | None = None


class Hub:
    """One process: listener port, HTTP port, delivery, contacts, journal."""

    def __init__(self, config: HubConfig | None = None, log: logging.Logger | None = None) -> None:
        self.config = config or HubConfig()
        self.log = log or logging.getLogger("spop.hub")
        self.delivery = InProcessDelivery(self.config.pop_ttl, self.config.dedupe_window)
        self.connections: set[HubConnection] = set()
        self.counters: Counter[str] = Counter()
        self.started_at = time.time()
        self.port = self.config.port
        self.http_port = self.config.http_port
        self._server: asyncio.AbstractServer | None = None
        self._http_runner: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._contacts: Any = None
        self.journal: Any = None
        self._dirty: list[HubConnection] = []  # connections with frames to flush

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ssl_context = self.ssl_context()
        if self.config.journal:
            self._open_journal()
        self._server = await loop.create_server(
            lambda: HubConnection(self),
            self.config.host,
            self.config.port,
            ssl=ssl_context,
            reuse_address=True,
            backlog=4096,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.config.http_port is not None:
            from .http import start_http

            self._http_runner, self.http_port = await start_http(self, ssl_context)
        self._tasks.append(loop.create_task(self._housekeeping()))
        self.log.info(
            "hub listening on %s port %s, http %s, journal %s",
            self.config.host,
            self.port,
            self.http_port,
            self.config.journal or "off",
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        if self.journal is not None:
            await self.journal.close()
            self.journal = None
        self.log.info("hub stopped")

    async def serve_forever(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return context

    def _open_journal(self) -> None:
        from .journal import Journal

        self.journal = Journal(self.config.journal, retain=max(self.config.dedupe_window, 1.0))
        rows = self.journal.open()
        for pop_id, media, resource in self.journal.expired_while_down:
            self.log.warning("pop %s for %s %s expired undelivered while the hub was down", pop_id, media, resource)
        self.delivery.expired += len(self.journal.expired_while_down)
        restored = 0
        now = time.time()
        for row in rows:
            if row.done or row.expires <= now:  # handled or expired: only a duplicate now
                self.delivery.remember(row.id, row.accepted)
            else:
                self.delivery.publish(
                    row.id, (row.media, row.resource), row.body, row.contact_id, row.expires
                )
                restored += 1
        self.journal.start()
        self.log.info("journal %s: %d pending pops restored", self.config.journal, restored)

    async def _housekeeping(self) -> None:
        """Expiry, contact forgetting, handshake timeouts, heartbeats and dead peers."""
        interval = max(0.05, min(1.0, self.config.heartbeat / 2))
        slices = self._slices(5)  # every connection is checked once per interval, a fifth a tick
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(interval / 5)
            try:
                self._check_connections(next(slices))
                if time.monotonic() - last_sweep >= interval:
                    last_sweep = time.monotonic()
                    self._sweep()
            except Exception:  # housekeeping must outlive any one bad connection or contact
                self.log.exception("housekeeping failed")

    def _sweep(self) -> None:
        for pending in self.delivery.expire():
            self.log.warning(
                "pop %s for %s %s expired undelivered after %.0f s",
                pending.id,
                *pending.key,
                self.config.pop_ttl,
            )
            if self.journal is not None:
                self.journal.done(pending.id)
        if self._contacts is not None:
            self._contacts.expire(datetime.now(UTC))

    def _slices(self, count: int) -> Any:
        """Endless slices of the connections, `count` per round, so no tick walks them all
        (10,000 pings at once stall the loop for 100 ms)."""
        while True:
            snapshot = list(self.connections)
            step = max(1, -(-len(snapshot) // count))
            for start in range(0, max(len(snapshot), 1), step):
                yield snapshot[start : start + step]

    def _check_connections(self, conns: list[HubConnection]) -> None:
        now = time.monotonic()
        hb = self.config.heartbeat
        for conn in conns:
            if conn.closed:
                continue
            if conn.role is None:
                # before hello only the handshake timeout applies (the client has no heartbeat
                # yet): not a dead peer, and no ping
                if now - conn.opened > self.config.handshake_timeout:
                    conn.fatal(Error.SCREENPOP_Initialization_Error, "no hello in time")
            elif now - conn.last_rx > 3 * hb:
                self.counters["dead_peers"] += 1
                self.log.warning("%s: silent for %.1f s: closed", conn.peer, now - conn.last_rx)
                conn.closed = True
                if conn.transport is not None:
                    conn.transport.abort()
            elif now - conn.last_tx > hb:
                conn.write(PING)

    # -- writes ---------------------------------------------------------------------------
    def mark_dirty(self, conn: HubConnection) -> None:
        """Flush `conn` at the end of this loop iteration, with every other written connection."""
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._flush)
        self._dirty.append(conn)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            try:
                conn.flush()
            except Exception:  # one broken transport must not strand the others' frames
                self.log.exception("%s: write failed", conn.peer)

    # -- auth -----------------------------------------------------------------------------
    def authorize(self, token: Any) -> str | None:
        """'source' (may publish), 'listener', or None (refused). Constant-time comparisons."""
        given = token.encode() if isinstance(token, str) else b""
        source = self.config.source_token or self.config.token
        if source is None:
            return "source"
        if hmac.compare_digest(given, source.encode()):
            return "source"
        if self.config.token is None:  # only a source token: listening stays open
            return "listener"
        if hmac.compare_digest(given, self.config.token.encode()):
            return "listener"
        return None

    # -- pops -----------------------------------------------------------------------------
    def accept(self, pop: dict[str, Any], dedupe: bool = True) -> asyncio.Future[None] | None:
        """Fan a checked pop out now; the future resolves when the journal has committed it."""
        pop_id = pop["id"]
        key = (pop["media"], pop["resource"])
        frame = encode({"op": "pop", "pop": pop})
        if not self.delivery.publish(pop_id, key, frame, pop["contact_id"], dedupe=dedupe):
            # a resend: answer it once the first copy is committed, not before
            return self.journal.commit_of(pop_id) if self.journal is not None else None
        self.counters["pops_accepted"] += 1
        if self.journal is not None:
            return self.journal.add(
                pop_id,
                key[0],
                key[1],
                pop["contact_id"],
                frame,
                time.time() + self.config.pop_ttl,
                remember=dedupe,
            )
        return None

    def publish_now(self, pops: Any) -> tuple[list[str], asyncio.Future[Any] | None]:
        """Check and accept one pop or a list at once; return their ids and what to await for
        their commit (None: nothing to wait for). Raises InputError before accepting any."""
        checked = normalize_pops(pops)
        given = pops if isinstance(pops, list) else [pops]
        commits: list[asyncio.Future[None]] = []
        for pop, raw in zip(checked, given, strict=True):
            # a source's id, a number included (`0` is the id "0"), makes the pop idempotent
            commit = self.accept(pop, dedupe=raw.get("id") not in (None, ""))
            if commit is not None and (not commits or commits[-1] is not commit):
                commits.append(commit)  # pops of one journal batch share one future
        ids = [p["id"] for p in checked]
        if not commits:
            return ids, None
        if len(commits) == 1:
            return ids, commits[0]
        return ids, asyncio.gather(*commits)

    async def publish(self, pops: Any) -> list[str]:
        """Check, accept and commit one pop or a list; raises InputError before accepting any."""
        ids, commit = self.publish_now(pops)
        if commit is not None:
            # shielded: the batch's future is shared; one cancelled caller must not cancel it
            # for every other source of the batch
            await asyncio.shield(commit)
        return ids

    def publish_frame(self, conn: HubConnection, pops: Any, ref: Any) -> None:
        """A `publish` frame: no task per frame; the answer rides the journal batch's commit."""
        try:
            ids, commit = self.publish_now(pops)
        except InputError as exc:
            self._refuse(conn, exc, ref)
            return
        if commit is None:
            conn.reply(ref, ids=ids)
            return

        def answer(done: asyncio.Future[Any]) -> None:
            if done.cancelled():
                self._refuse(conn, RuntimeError("the journal commit was cancelled"), ref)
            elif done.exception() is not None:
                self._refuse(conn, done.exception(), ref)  # type: ignore[arg-type]
            else:
                conn.reply(ref, ids=ids)

        commit.add_done_callback(answer)

    def ack(self, pop_id: str, keys: Any = None) -> None:
        """A listener handled the pop; acks for unknown pops or another key's are only counted."""
        if self.delivery.ack(pop_id, keys) is not None:
            if self.journal is not None:
                self.journal.done(pop_id)
        else:
            self.counters["unknown_acks"] += 1

    # -- contacts -------------------------------------------------------------------------
    @property
    def contacts(self) -> Any:
        if self._contacts is None:
            from .contacts import ContactTracker

            self._contacts = ContactTracker(
                forget_after=self.config.contact_forget_after,
                idle_expiry=self.config.contact_idle_expiry,
            )
        return self._contacts

    async def apply_contacts(self, events: Any) -> dict[str, Any]:
        """Apply lifecycle events in order; their pops are accepted even if a later event fails."""
        from .contacts import ContactEventError

        error: ContactEventError | None = None
        try:
            outcomes = self.contacts.apply_batch(events, datetime.now(UTC))
        except ContactEventError as exc:
            error = exc
            outcomes = getattr(exc, "applied", [])
        futures = []
        pop_ids: list[str] = []
        for outcome in outcomes:
            if outcome.ended:
                for pending in self.delivery.withdraw(outcome.contact_id):
                    if self.journal is not None:
                        self.journal.done(pending.id)
            for event in outcome.pops:
                pop = event.to_dict()
                pop_ids.append(pop["id"])
                future = self.accept(pop, dedupe=False)  # the hub made the id
                if future is not None and future not in futures:
                    futures.append(future)
        self.counters["contact_events"] += len(outcomes)
        if futures:
            await asyncio.shield(asyncio.gather(*futures))
        result = {"applied": len(outcomes), "pops": pop_ids}
        if error is not None:
            error.applied_result = result  # type: ignore[attr-defined]
            raise error
        return result

    async def ingest_frame(self, conn: HubConnection, body: Any, ref: Any) -> None:
        """A `contact` frame from a source on the listener port."""
        try:
            conn.reply(ref, **await self.apply_contacts(body))
        except Exception as exc:
            self._refuse(conn, exc, ref)

    def _refuse(self, conn: HubConnection, exc: BaseException, ref: Any) -> None:
        """An error frame carrying the refusal's detail (error, field, index, what was applied)."""
        detail = (
            {**exc.to_dict(), **getattr(exc, "applied_result", {})}  # type: ignore[attr-defined]
            if hasattr(exc, "to_dict")
            else {"error": "internal", "message": str(exc)}
        )
        self.counters["rejected"] += 1
        if not hasattr(exc, "to_dict"):
            self.log.error("ingest failed: %r", exc)
        frame: dict[str, Any] = {
            "op": "error",
            "code": Error.SCREENPOP_Framework_Error.value,
            "message": str(exc) or detail.get("message", ""),
            "detail": detail,
        }
        if ref is not None:
            frame["ref"] = ref
        conn.write(orjson.dumps(frame) + b"\n")

    # -- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        listeners = [
            {"media": media, "resource": resource, "connections": count}
            for (media, resource), count in self.delivery.routing.counts()
        ]
        counters = dict(self.counters)
        counters.update(self.delivery.counters())
        return {
            "version": _version(),
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "port": self.port,
            "http_port": self.http_port,
            "journal": self.config.journal,
            "connections": len(self.connections),
            "registrations": sum(len(c.keys) for c in self.connections),
            "listeners": listeners,
            "pending": len(self.delivery.pending),
            "contacts": len(self._contacts) if self._contacts is not None else 0,
            "counters": counters,
        }


def _version() -> str:
    from .. import __version__

    return __version__


def default_journal_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("spop", appauthor=False)) / "journal.sqlite3"
