"""The hub's lifecycle: start both ports, sweep, heartbeat, stop. Accepting pops lives here too."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ..model import Error, utc_now_iso
from ..pops import InputError, normalize_pop, normalize_pops
from ..protocol import HEARTBEAT, MAX_FRAME, change_frame, is_change_frame, pop_frame, pop_too_large
from .connection import PING, HubConnection
from .contacts import ContactEventError, source_view
from .delivery import InProcessDelivery, sent_phrase
from .gcpolicy import FreezeOnGrowth
from .journal import JournalUnavailable

EVENT_IDS_KEPT = 64  # per contact in its KV state (backend nats): resends to any hub are duplicates


@dataclass(slots=True)
class _Held:
    """A pop accepted into a journal batch, not yet delivered: it goes out once the batch commits,
    never if the commit fails (its source then got a 503, and may send it again)."""

    id: str
    key: tuple[str, str]
    frame: bytes
    contact_id: str
    expires: float
    dedupe: bool
    commit: asyncio.Future[None]
    withdrawn: bool = False
    change: bool = False  # a contact update, not a pop


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
    max_inflight: int = 1000  # pops sent to one connection and not yet acked, at most
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
    # browsers (docs/browser.md): other origins allowed to use the stream (CORS), how long a
    # signed-in session lasts, the panel's buttons ({label, url} with `{field}` templates)
    browser_origins: list[str] = field(default_factory=list)
    browser_session_ttl: float = 12 * 3600.0
    panel_buttons: list[dict[str, str]] = field(default_factory=list)
    # where pops, acks and contact state live: "embedded" (this process, the SQLite journal) or
    # "nats" (a JetStream stream and KV bucket shared by several hubs; docs/cluster.md)
    backend: str = "embedded"
    nats_servers: str = "nats://127.0.0.1:4222"  # comma-separated: every node of the cluster
    nats_token: str | None = None
    nats_creds: str | None = None  # a .creds file (user JWT and seed)
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    nats_replicas: int = 1  # 3 on a three-node cluster: any one node may fail
    nats_stream: str = "SPOP"
    nats_kv_bucket: str = "spop-contacts"
    nats_timeout: float = 5.0  # for JetStream to acknowledge a write


class Hub:
    """One process: listener port, HTTP port, delivery, contacts, journal."""

    def __init__(self, config: HubConfig | None = None, log: logging.Logger | None = None) -> None:
        self.config = config or HubConfig()
        self.log = log or logging.getLogger("spop.hub")
        self.delivery: Any = self._make_delivery()
        self.connections: set[HubConnection] = set()
        self.counters: Counter[str] = Counter()
        self.started_at = time.time()
        self.port = self.config.port
        self.http_port = self.config.http_port
        self._server: asyncio.AbstractServer | None = None
        self._http_runner: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._gc = FreezeOnGrowth()  # connections out of the full collections (gcpolicy.py)
        self._contacts: Any = None
        self.journal: Any = None
        self._dirty: list[HubConnection] = []  # connections with frames to flush
        self.sources: Any = (
            None  # a SourceRunner: sources run inside the hub, routes on its HTTP port
        )
        # Called with each newly accepted pop (`spop serve --verbose` logs it); None: no cost.
        self.on_pop: Callable[[dict[str, Any]], None] | None = None
        self._held: dict[str, _Held] = {}  # pops waiting for their journal commit, by id
        self._batches: dict[asyncio.Future[None], list[_Held]] = {}  # the same, by commit
        # contact id → the turn of the contact request changing it: the next waits for it
        self._contact_turns: dict[str, asyncio.Future[None]] = {}
        self._settling: set[asyncio.Task[None]] = set()  # unanswered state writes (NATS)
        self.browser_streams: set[Any] = set()  # open SSE streams (hub/browser.py)
        self.browser_sessions: Any = None  # signs their cookies; made at start

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def clustered(self) -> bool:
        return self.config.backend == "nats"

    def _make_delivery(self) -> Any:
        """The one place the delivery backend is chosen."""
        if self.clustered:
            from .nats_delivery import NatsDelivery

            return NatsDelivery(self.config, self.log)
        return InProcessDelivery(self.config.pop_ttl, self.config.dedupe_window)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ssl_context = self.ssl_context()
        if self.clustered:
            await self.delivery.start()  # JetStream is the journal: no SQLite file
        elif self.config.journal:
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
            from .browser import Sessions, hub_secret
            from .http import start_http

            self.browser_sessions = Sessions(
                hub_secret(self.config.journal),
                (self.config.token, self.config.source_token),
                self.config.browser_session_ttl,
            )

            self._http_runner, self.http_port = await start_http(self, ssl_context)
        self._tasks.append(loop.create_task(self._housekeeping()))
        if self.sources is not None:
            await self.sources.start()
        self.log.info(
            "hub listening on %s port %s, http %s, journal %s",
            self.config.host,
            self.port,
            self.http_port,
            self.config.journal or "off",
        )

    async def stop(self) -> None:
        if self.sources is not None:
            await self.sources.stop()
        for task in list(self._settling):
            task.cancel()
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
        if self.clustered:
            await self.delivery.close()
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
        for warning in self.journal.warnings:
            self.log.warning("%s", warning)
        for pop_id, media, resource in self.journal.expired_while_down:
            self.log.warning(
                "pop %s for %s %s expired undelivered while the hub was down",
                pop_id,
                media,
                resource,
            )
        self.delivery.expired += len(self.journal.expired_while_down)
        restored = 0
        now = time.time()
        for row in rows:
            if row.done or row.expires <= now:  # handled or expired: only a duplicate now
                self.delivery.remember(row.id, row.accepted)
            else:
                self.delivery.publish(
                    row.id,
                    (row.media, row.resource),
                    row.body,
                    row.contact_id,
                    row.expires,
                    change=is_change_frame(row.body),
                )
                restored += 1
        contacts = self._restore_contacts(self.journal.contacts)
        self.journal.start()
        self.log.info(
            "journal %s: %d pending pops and %d contacts restored",
            self.config.journal,
            restored,
            contacts,
        )

    def _restore_contacts(self, rows: list[tuple[str, bytes]]) -> int:
        """Track the journalled contacts again; one unreadable state is logged, not fatal."""
        if not rows:
            return 0
        tracker = self.contacts
        restored = []
        for contact_id, state in rows:
            try:
                loaded = orjson.loads(state)
                tracker.restore(loaded)
                restored.append(loaded)
            except Exception as exc:
                self.log.error("journal: contact %s cannot be restored: %r", contact_id, exc)
        try:  # the duplicate window of their events goes on across the restart
            tracker.restore_event_ids(restored)
        except Exception as exc:
            self.log.error("journal: contact event ids cannot be restored: %r", exc)
        return len(tracker)

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
        # browser streams count as connections: each holds its request, response and transport
        self._gc.tick(len(self.connections) + len(self.browser_streams))
        for pending in self.delivery.expire():
            if pending.change:  # normal when no listener of its key asked for updates
                self.log.debug("change %s for %s %s expired", pending.id, *pending.key)
                if self.journal is not None:
                    self.journal.done(pending.id)
                continue
            # "undelivered": no listener of its key ever got it; else it was sent, never acked
            self.log.warning(
                "pop %s for %s %s expired %s after %.0f s",
                pending.id,
                *pending.key,
                sent_phrase(pending.sent),
                self.config.pop_ttl,
            )
            if self.journal is not None:
                self.journal.done(pending.id)
        if self._contacts is not None:
            for contact_id in self._contacts.forget_expired(datetime.now(UTC)):
                if self.journal is not None:
                    self.journal.forget_contact(contact_id)

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
    def accept(
        self, pop: dict[str, Any], dedupe: bool = True, frame: bytes | None = None
    ) -> asyncio.Future[None] | None:
        """Take a checked pop. With a journal it is delivered once committed (the future resolves
        then); without, at once (None). A resend is answered with the first copy's commit."""
        pop_id = pop["id"]
        key = (pop["media"], pop["resource"])
        if frame is None:
            frame = pop_frame(pop)
        if self.clustered:
            return self._accept_clustered(pop, key, frame, dedupe)
        if self.journal is None:
            if self.delivery.publish(pop_id, key, frame, pop["contact_id"], dedupe=dedupe):
                self.counters["pops_accepted"] += 1
                if self.on_pop is not None:
                    self.on_pop(pop)
            return None
        held = self._held.get(pop_id)
        if (
            held is not None
            or self.delivery.is_duplicate(pop_id)
            or pop_id in self.delivery.pending
        ):
            self.delivery.duplicates += 1  # answered once the first copy is committed, not before
            return held.commit if held is not None else None
        expires = time.time() + self.config.pop_ttl
        commit = self.journal.add(
            pop_id, key[0], key[1], pop["contact_id"], frame, expires, remember=dedupe
        )
        held = _Held(pop_id, key, frame, pop["contact_id"], expires, dedupe, commit)
        self._held[pop_id] = held
        batch = self._batches.get(commit)
        if batch is None:
            batch = self._batches[commit] = []
            commit.add_done_callback(self._committed)  # before any source's: delivered first
        batch.append(held)
        return commit

    def _accept_clustered(
        self,
        pop: dict[str, Any],
        key: tuple[str, str],
        frame: bytes | None,
        dedupe: bool,
        takes_back: bool | None = None,
    ) -> asyncio.Future[None]:
        """Into the JetStream stream; the future resolves once JetStream stored it (every hub
        then delivers it to its listeners of the key), or fails with a 503 if it could not.
        `takes_back` not None: `pop` is a contact update (a `change` frame's body)."""
        from .journal import JournalUnavailable

        change = takes_back is not None
        if frame is None:
            frame = change_frame(pop) if change else pop_frame(pop)

        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def stored(write: asyncio.Future[bool]) -> None:
            if done.done():
                return
            if write.cancelled() or write.exception() is not None:
                self.counters["journal_refused"] += 1
                cause = write.exception() if not write.cancelled() else RuntimeError("cancelled")
                done.set_exception(JournalUnavailable(cause))  # type: ignore[arg-type]
                return
            if write.result():
                if change:
                    self.counters["changes_accepted"] += 1
                else:
                    self.counters["pops_accepted"] += 1
                    if self.on_pop is not None:
                        self.on_pop(pop)
            done.set_result(None)

        self.delivery.submit(
            pop["id"], key, frame, pop["contact_id"], dedupe, change, bool(takes_back)
        ).add_done_callback(stored)
        return done

    def _committed(self, commit: asyncio.Future[None]) -> None:
        """A journal batch is done: deliver its pops, or drop them all if it failed."""
        held = self._batches.pop(commit, [])
        failed = commit.cancelled() or commit.exception() is not None
        for pop in held:
            if self._held.get(pop.id) is pop:
                del self._held[pop.id]
            if failed:
                self.counters["journal_refused"] += 1
            elif pop.change:
                if self.delivery.publish(
                    pop.id, pop.key, pop.frame, pop.contact_id, pop.expires, pop.dedupe, change=True
                ):
                    self.counters["changes_accepted"] += 1
            elif not pop.withdrawn:
                self.delivery.publish(
                    pop.id, pop.key, pop.frame, pop.contact_id, pop.expires, pop.dedupe
                )
                self.counters["pops_accepted"] += 1
                if self.on_pop is not None:  # `--verbose` only: decoding costs nothing otherwise
                    self.on_pop(orjson.loads(pop.frame)["pop"])

    def accept_change(self, change: dict[str, Any], dedupe: bool) -> None:
        """Take a contact update like a pop: journalled, delivered once committed, pending until
        a listener of its key acks it (only connections that asked for updates get it)."""
        change_id = change["id"]
        key = (change["media"], change["resource"])
        frame = change_frame(change)
        if self.journal is None:
            if self.delivery.publish(
                change_id, key, frame, change["contact_id"], dedupe=dedupe, change=True
            ):
                self.counters["changes_accepted"] += 1
            return
        if (
            change_id in self._held
            or self.delivery.is_duplicate(change_id)
            or change_id in self.delivery.pending
        ):
            return  # a retried event's update (its id derives from the event's)
        expires = time.time() + self.config.pop_ttl
        commit = self.journal.add(
            change_id, key[0], key[1], change["contact_id"], frame, expires, remember=dedupe
        )
        held = _Held(change_id, key, frame, change["contact_id"], expires, dedupe, commit)
        held.change = True
        self._held[change_id] = held
        batch = self._batches.get(commit)
        if batch is None:
            batch = self._batches[commit] = []
            commit.add_done_callback(self._committed)
        batch.append(held)

    def _pending_pops(self, contact_id: str, key: tuple[str, str], held: list[str]) -> list[str]:
        """The contact's pops for `key` not yet acked: pending, or waiting for their commit."""
        pending = self.delivery.pending
        ids = [i for i in self.delivery.of_contact(contact_id) if pending[i].key == key]
        ids += [i for i in held if i in self._held and self._held[i].key == key]
        return ids

    def _unhold(self, pop_id: str) -> bool:
        """Withdraw a pop still waiting for its commit: it is never delivered, its row is done."""
        held = self._held.pop(pop_id, None)
        if held is None:
            return False
        held.withdrawn = True
        self.delivery.withdrawn += 1
        if self.journal is not None:
            self.journal.done(pop_id)
        return True

    def publish_now(self, pops: Any) -> tuple[list[str], asyncio.Future[Any] | None]:
        """Check and accept one pop or a list at once; return their ids and what to await for
        their commit (None: nothing to wait for). Raises InputError before accepting any."""
        if pops.__class__ is dict:  # one pop (a source's usual request): no lists around it
            pop = normalize_pop(pops, utc_now_iso())
            frame = pop_frame(pop)
            if len(frame) - 1 > self.config.max_frame:
                self.pop_frame(pop)  # refused, as below
            return [pop["id"]], self.accept(pop, pops.get("id") not in (None, ""), frame)
        checked = normalize_pops(pops)
        many = isinstance(pops, list)
        given = pops if many else [pops]
        frames = [pop_frame(pop) for pop in checked]
        longest = max(map(len, frames), default=0) - 1
        if longest > self.config.max_frame:  # the first pop over the limit, named as pop_frame does
            for index, pop in enumerate(checked):
                self.pop_frame(pop, index if many else None)
        commits: list[asyncio.Future[None]] = []
        for pop, raw, frame in zip(checked, given, frames, strict=True):
            # a source's id, a number included (`0` is the id "0"), makes the pop idempotent
            commit = self.accept(pop, dedupe=raw.get("id") not in (None, ""), frame=frame)
            if commit is not None and (not commits or commits[-1] is not commit):
                commits.append(commit)  # pops of one journal batch share one future
        ids = [p["id"] for p in checked]
        if not commits:
            return ids, None
        if len(commits) == 1:
            return ids, commits[0]
        return ids, asyncio.gather(*commits)

    def pop_frame(self, pop: dict[str, Any], index: int | None = None) -> bytes:
        """The pop's frame; InputError 413 `pop_too_large` when it is over max_frame (the hub
        never sends a frame longer than the limit it announces)."""
        frame = pop_frame(pop)
        why = pop_too_large(frame, self.config.max_frame)
        if why is not None:
            error = InputError(413, "pop_too_large", why, "contact_data")
            if index is not None:
                error.index = index
                error.message = f"pop {index}: {why}"
            raise error
        return frame

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

    def ack(self, pop_id: str, keys: Any = None) -> bool:
        """A listener handled the pop (or change); acks for unknown ids or another key's are only
        counted. True when it settled a pending one."""
        if self.delivery.ack(pop_id, keys) is not None:
            if self.journal is not None:
                self.journal.done(pop_id)
            return True
        self.counters["unknown_acks"] += 1
        return False

    # -- contacts -------------------------------------------------------------------------
    @property
    def contacts(self) -> Any:
        if self._contacts is None:
            from .contacts import ContactTracker

            self._contacts = ContactTracker(
                forget_after=self.config.contact_forget_after,
                idle_expiry=self.config.contact_idle_expiry,
                dedupe_window=self.config.dedupe_window,
                max_frame=self.config.max_frame,
            )
        return self._contacts

    async def apply_contacts(
        self,
        events: Any,
        shield: bool = True,
        skip_refused: bool = False,
        origin: str | None = None,
    ) -> dict[str, Any]:
        """Apply lifecycle events in order; their pops are accepted even if a later event fails.

        With a journal, the answer comes once everything the events changed is committed in one
        batch: their pops, the withdrawals of an `ended`, and each contact's new state. If that
        commit fails, none of it happened (JournalUnavailable). Requests about the same contact
        take turns, in the order they came, until their commit is done (`_line_up`), so a
        refused commit is undone without undoing anyone else's events, even when its caller has
        gone away. `shield=False`: the caller is never cancelled (the HTTP front's answers), so
        the shared commit needs no shield. `skip_refused`: a refused event does not stop the
        batch; the ones after it are applied at once, in order, and the answer's `refused`
        lists each refusal (a source inside the hub whose later batches are already applied:
        sent again, the rest would come after them). `origin`: the source inside the hub that
        sent them, kept with the contacts they start (`ContactTracker.open_from`)."""
        ids = _contact_ids(events)
        if self.clustered:
            return await self._apply_contacts_clustered(events, ids, skip_refused, origin)
        turns = self._contact_turns
        if turns and not turns.keys().isdisjoint(ids):
            turn = await self._line_up(ids)
            try:
                commit, result, error = self._stage_contacts(
                    events, ids, ContactEventError, turn, skip_refused, origin
                )
            except BaseException:  # a rule we got wrong: the contacts must not stay locked
                self._free_turn(turn, ids)
                raise
        else:
            # staged at once (nothing else runs meanwhile); the commit is then these contacts' turn
            commit, result, error = self._stage_contacts(
                events, ids, ContactEventError, None, skip_refused, origin
            )
        if commit is not None:
            try:
                await (asyncio.shield(commit) if shield else commit)
            except JournalUnavailable as exc:
                raise _unavailable(exc) from exc
        if error is not None and not skip_refused:
            error.applied_result = result  # type: ignore[attr-defined]
            raise error
        return result

    async def _apply_contacts_clustered(
        self, events: Any, ids: set[str], skip_refused: bool = False, origin: str | None = None
    ) -> dict[str, Any]:
        """Contact state in the JetStream KV bucket: read it, apply the events, write it back
        at the revision read; another hub's write in between means read again and retry. Then
        the pops (and withdrawals) go into the stream; the answer waits for JetStream."""
        turn = await self._line_up(ids)  # this hub's own requests about a contact, in turn
        failure: Exception | None = None
        refused: list[Exception] = []
        try:
            tracker = self.contacts
            for _attempt in range(50):
                try:
                    loaded = await self.delivery.load_contacts(ids)
                except Exception as exc:
                    raise JournalUnavailable(exc) from exc
                now = datetime.now(UTC)
                applied: dict[str, list[str]] = {}  # contact → its recent event ids (any hub's)
                popped: dict[str, list[list[str]]] = {}  # contact → the keys it popped (any hub)
                recorded: dict[str, dict[str, Any]] = {}  # contact → event id → [at, writes]
                ended: dict[str, bool] = {}  # contact → it had ended when read
                for contact_id, (state, _) in loaded.items():
                    tracker.put_back({contact_id: None})
                    if state is not None:
                        applied[contact_id] = list(state.get("event_ids", ()))
                        popped[contact_id] = list(state.get("pop_keys", ()))
                        recorded[contact_id] = _stamped(state)
                        ended[contact_id] = bool(state.get("ended_seen"))
                        for event_id in applied[contact_id]:
                            tracker.event_ids.add(
                                event_id, now
                            )  # a resend to this hub: a duplicate
                        tracker.restore(state)
                before = tracker.snapshot(ids)
                try:
                    outcomes, refused = tracker.apply_batch(events, now, origin), []
                except ContactEventError as exc:
                    outcomes, refused = _past_refusal(
                        tracker, events, exc, ContactEventError, skip_refused, origin
                    )
                changed = {o.contact_id for o in outcomes if not o.duplicate}
                states = {c: tracker.state(c) for c in changed}
                moment = time.time()
                for outcome in outcomes:
                    if outcome.event_id is not None and not outcome.duplicate:
                        applied.setdefault(outcome.contact_id, []).append(outcome.event_id)
                        recorded.setdefault(outcome.contact_id, {})[outcome.event_id] = [
                            moment,
                            _stream_writes(outcome),
                            0,  # timed by this hub's clock until JetStream's is known
                        ]
                    keys = popped.setdefault(outcome.contact_id, [])
                    for event in outcome.pops:
                        key = [event.media.value, event.resource]
                        if key not in keys:
                            keys.append(key)
                for contact_id, state in states.items():
                    if state is not None:  # these travel with the state, in the same write
                        state["event_ids"] = applied.get(contact_id, [])[-EVENT_IDS_KEPT:]
                        state["pop_keys"] = popped.get(contact_id, [])
                        state["writes"] = _still_replayable(
                            recorded.get(contact_id, {}), moment, self.config.dedupe_window
                        )
                revisions = {c: loaded.get(c, (None, 0))[1] for c in changed}
                try:
                    stored = await self.delivery.store_contacts(states, revisions)
                except Exception as exc:
                    stored = False
                    tracker.put_back(before)
                    _forget_events(tracker, outcomes)
                    if getattr(exc, "ambiguous", False):  # it may be stored all the same, later
                        self._settle_later(applied, outcomes)
                    raise JournalUnavailable(exc) from exc
                if stored:
                    break
                tracker.put_back(before)  # another hub changed one of them: again, from its state
                _forget_events(tracker, outcomes)
                self.counters["contact_conflicts"] += 1
            else:
                raise JournalUnavailable(RuntimeError("contact state kept changing on other hubs"))
            writes: list[asyncio.Future[Any]] = []
            pop_ids: list[str] = []
            for outcome in outcomes:  # into the stream in the embedded hub's order
                contact_id, event_id = outcome.contact_id, outcome.event_id
                if not outcome.duplicate:  # made once, for the state's record and for here
                    record = recorded.get(contact_id, {}).get(event_id or "")
                    entries = record[1] if record is not None else _stream_writes(outcome)
                else:  # a resend: what it wrote again (its first answer may have been lost)
                    entries = _replayable(
                        recorded.get(contact_id, {}).get(event_id or ""),
                        time.time(),
                        self.config.dedupe_window,
                    )
                    if ended.get(contact_id) and not any(e[0] == "end" for e in entries):
                        entries = []  # an earlier event of a call over: its pop would outlive it
                    self.counters["contact_writes_replayed"] += len(entries)
                made = self._write_entries(
                    contact_id, entries, event_id is not None, popped.get(contact_id, []), writes
                )
                if not outcome.duplicate:
                    pop_ids += made
            self.counters["contact_events"] += len(outcomes)
            result: dict[str, Any] = {"applied": len(outcomes), "pops": pop_ids}
            if skip_refused:
                result["refused"] = refused
            if writes:
                try:
                    await asyncio.gather(*writes)
                except JournalUnavailable:
                    raise
                except Exception as exc:  # an `end` JetStream did not store
                    self.counters["journal_refused"] += 1
                    raise JournalUnavailable(exc) from exc
        except JournalUnavailable as exc:
            failure = exc
            raise
        finally:
            self._free_turn(turn, ids, error=failure)
        if refused and not skip_refused:
            error = refused[0]
            error.applied_result = result  # type: ignore[attr-defined]
            raise error
        return result

    def _write_entries(
        self,
        contact_id: str,
        entries: list[list[Any]],
        dedupe: bool,
        popped: list[list[str]],
        writes: list[asyncio.Future[Any]],
    ) -> list[str]:
        """Into the stream, an event's writes (`_stream_writes`, or as recorded in its contact's
        KV state), each future added to `writes`; the ids of its pops."""
        pop_ids: list[str] = []
        for entry in entries:
            if entry[0] == "change":
                change = entry[1]
                key = (change["media"], change["resource"])
                writes.append(
                    self._accept_clustered(change, key, None, dedupe, takes_back=entry[2])
                )
            elif entry[0] == "end":  # on every key it popped, whichever hub popped it
                keys = [(k[0], k[1]) for k in popped]
                self.delivery.withdraw(contact_id, keys, writes)
            else:
                pop = entry[1]
                pop_ids.append(pop["id"])
                writes.append(self.accept(pop, dedupe=dedupe))
        return pop_ids

    def _settle_later(self, applied: dict[str, list[str]], outcomes: list[Any]) -> None:
        """A contact state write JetStream did not answer (a quorum lost as it was sent): it may
        be stored when the quorum is back, with nothing of what its events write in the stream
        (this hub stopped there), and the source, told to resend, may not. Read it again until
        it can be read; if it was stored and no later event came, write what it recorded."""
        new = {o.event_id for o in outcomes if o.event_id is not None and not o.duplicate}
        contacts = {o.contact_id for o in outcomes if o.event_id in new}
        mine = {c: [e for e in applied.get(c, []) if e in new] for c in contacts}
        if mine:
            task = asyncio.get_running_loop().create_task(self._settle(mine))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle(self, mine: dict[str, list[str]]) -> None:
        """`_settle_later`'s reads, until `pop_ttl` has passed: a write stuck in JetStream (a
        proposal waiting for its quorum) may still be stored any time until then."""
        delay, deadline = 0.5, time.monotonic() + max(self.config.pop_ttl, 1.0)
        while mine and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            try:
                loaded = await self.delivery.load_contacts(set(mine))
            except Exception as exc:  # still no quorum, or no link: again later
                self.log.debug("unanswered contact state write: still unreadable (%r)", exc)
                continue
            writes: list[asyncio.Future[Any]] = []
            for contact_id, (state, _) in loaded.items():
                ids = mine[contact_id]
                applied = list(state.get("event_ids", ())) if state is not None else []
                if state is None or not set(ids) <= set(applied):
                    continue  # not stored (yet)
                del mine[contact_id]
                if applied[-len(ids) :] != ids:
                    continue  # a later event came: its source went on, the resend was done
                recorded = state.get("writes") or {}
                popped = list(state.get("pop_keys", ()))
                for event_id in ids:
                    record = recorded.get(event_id)
                    entries = record[1] if isinstance(record, list) and len(record) > 1 else []
                    self.counters["contact_writes_settled"] += len(entries)
                    self._write_entries(contact_id, entries, True, popped, writes)
            if writes:
                done = await asyncio.gather(*writes, return_exceptions=True)
                failed = [r for r in done if isinstance(r, BaseException)]
                self.log.warning(
                    "contact state stored late (unanswered when written): %d of its stream "
                    "writes sent now%s",
                    len(done) - len(failed),
                    f", {len(failed)} failed: {failed[0]!r}" if failed else "",
                )

    async def _line_up(self, ids: set[str]) -> asyncio.Future[None]:
        """Take this request's place behind the requests about any of these contacts already in
        line, then wait until they are done (embedded: their commits done and their outcomes
        applied). Returns this request's turn; `_free_turn` ends it. The place is taken before
        the wait, so a request that comes meanwhile lines up behind this one, never before it:
        a source's batches in flight are applied in the order they were sent. If one of those
        ahead was not committed, this one is refused too (503, nothing applied), and so is
        whoever lined up behind it: applied now, it would come before that one's resend."""
        turns = self._contact_turns
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ahead = {turns[c] for c in ids if c in turns}
        for contact_id in ids:
            turns[contact_id] = turn
        if not ahead:
            return turn
        try:
            await asyncio.wait(ahead)  # through callbacks: after the commit's own (`finish`)
        except BaseException:  # cancelled: the turn passes on once those ahead are done
            self._free_turn(turn, ids, ahead)
            raise
        failed = _failure(ahead)
        if failed is not None:
            self._free_turn(turn, ids, error=_unavailable(failed))
            raise _unavailable(failed)
        return turn

    def _free_turn(
        self,
        turn: asyncio.Future[None],
        ids: set[str],
        ahead: Any = (),
        error: Exception | None = None,
    ) -> None:
        """End a request's turn (failed with `error`: its commit was refused), once the turns
        `ahead` of it are done too; whoever waits for it goes next."""
        pending = [f for f in ahead if not f.done()]
        if pending:
            left = [len(pending)]

            def one_done(_: asyncio.Future[Any]) -> None:
                left[0] -= 1
                if left[0] == 0:
                    failed = _failure(ahead)
                    if error is None and failed is not None:
                        self._free_turn(turn, ids, error=_unavailable(failed))
                    else:
                        self._free_turn(turn, ids, error=error)

            for future in pending:
                future.add_done_callback(one_done)
            return
        turns = self._contact_turns
        for contact_id in ids:
            if turns.get(contact_id) is turn:
                del turns[contact_id]
        if turn.done():
            return
        if error is None:
            turn.set_result(None)
        else:
            turn.set_exception(error)
            turn.exception()  # retrieved: a turn nobody waits for is no leak

    def _stage_contacts(
        self,
        events: Any,
        ids: set[str],
        refusal: type[Exception],
        turn: asyncio.Future[None] | None = None,
        skip_refused: bool = False,
        origin: str | None = None,
    ) -> tuple[asyncio.Future[None] | None, dict[str, Any], Exception | None]:
        """Apply the events in memory and queue what they change in one journal batch; return
        that batch's commit (None without a journal), the answer, and the (first) refusal if any.
        Until that commit's outcome is applied, it is the turn of the contacts `ids`: another
        request about any of them waits for it (`_line_up`). `turn`: this request lined up for
        it; else the commit itself is the turn (nobody was in line)."""
        tracker = self.contacts
        before = tracker.snapshot(ids) if self.journal is not None else {}
        error: Exception | None = None
        try:
            outcomes = tracker.apply_batch(events, datetime.now(UTC), origin)
        except refusal as exc:
            error = exc
            outcomes, refused = _past_refusal(tracker, events, exc, refusal, skip_refused, origin)
        pop_ids: list[str] = []
        held: dict[str, list[str]] = {}  # contact → pops of this request still waiting
        ended: list[str] = []
        staged: set[str] = set()  # pops whose withdrawal rides this request's commit
        taken: list[str] = []  # pops taken back (answered elsewhere) once committed
        for outcome in outcomes:
            for change in outcome.changes:
                body = change.to_dict()
                if change.takes_back:
                    key = (change.media, change.resource)
                    pending = self._pending_pops(
                        outcome.contact_id, key, held.get(outcome.contact_id, [])
                    )
                    if pending:  # its pop was never acked: taken back, not followed up
                        if body["change"] == "ended":
                            body["reason"] = "ended"
                        body["change"] = "withdrawn"
                        if not outcome.ended:  # an `ended` withdraws all of them below
                            for pop_id in pending:
                                if self._unhold(pop_id):
                                    held[outcome.contact_id].remove(pop_id)
                                elif self.journal is None:
                                    self.delivery.take_back([pop_id])
                                else:
                                    self.journal.done(pop_id)
                                    staged.add(pop_id)
                                    taken.append(pop_id)
                self.accept_change(body, dedupe=outcome.event_id is not None)
            if outcome.ended:
                if self.journal is None:
                    self.delivery.withdraw(outcome.contact_id)
                else:
                    for pop_id in held.pop(outcome.contact_id, []):
                        self._unhold(pop_id)  # never delivered: the call is over
                    # withdrawn once the `ended` is committed, their rows done in the same batch
                    ended.append(outcome.contact_id)
                    for pop_id in self.delivery.of_contact(outcome.contact_id):
                        self.journal.done(pop_id)
                        staged.add(pop_id)
            for pop, frame in outcome.wire:  # the pops' wire forms, made by the tracker
                pop_ids.append(pop["id"])
                # an id derived from the event's id may come again (a retried webhook after a
                # restart): keep it in the journal's duplicate window; the hub's own need not
                self.accept(pop, dedupe=outcome.event_id is not None, frame=frame)
                held.setdefault(outcome.contact_id, []).append(pop["id"])
        self.counters["contact_events"] += len(outcomes)
        result: dict[str, Any] = {"applied": len(outcomes), "pops": pop_ids}
        if skip_refused:
            result["refused"] = refused if error is not None else []
        journal = self.journal
        if journal is None or not outcomes:
            if turn is not None:
                self._free_turn(turn, ids)
            return None, result, error
        for contact_id in {outcome.contact_id: None for outcome in outcomes}:
            state = tracker.state_json(contact_id)
            if state is None:
                journal.forget_contact(contact_id)
            else:
                journal.put_contact(contact_id, state)
        commit = journal.barrier()  # the batch holding the pops, the dones and the states
        turns = self._contact_turns
        if turn is None:
            for contact_id in ids:
                turns[contact_id] = commit

        def finish(done: asyncio.Future[None]) -> None:
            # the commit's outcome applied, then the turn freed: before any request waiting
            # for this turn wakes (it waits through a callback added after this one, or for
            # `turn`, resolved below)
            failed = done.cancelled() or done.exception() is not None
            try:
                if failed:
                    tracker.put_back(before)  # nothing of this request happened
                    for outcome in outcomes:  # so a resend of its events applies them
                        if outcome.event_id is not None and not outcome.duplicate:
                            tracker.event_ids.forget(outcome.event_id)
                    self.counters["contact_events"] -= len(outcomes)
                    return
                if taken:
                    self.delivery.take_back(taken)
                for contact_id in ended:
                    for pending in self.delivery.withdraw(contact_id):
                        if pending.id not in staged:
                            journal.done(pending.id)  # a pop that came after the `ended` was staged
            finally:
                if turn is None:
                    for contact_id in ids:
                        if turns.get(contact_id) is commit:
                            del turns[contact_id]
                else:
                    self._free_turn(turn, ids, error=_unavailable(done) if failed else None)

        commit.add_done_callback(finish)
        return commit, result, error

    async def ingest_frame(
        self, conn: HubConnection, body: Any, ref: Any, origin: str | None = None
    ) -> None:
        """A `contact` frame from a source on the listener port (`origin`: the source's name,
        kept with the contacts it starts, for `open_contacts`)."""
        try:
            conn.reply(ref, **await self.apply_contacts(body, origin=origin))
        except Exception as exc:
            self._refuse(conn, exc, ref)

    async def open_contacts(self, origin: str) -> list[dict[str, Any]]:
        """The contacts not ended that the source named `origin` started, each as
        `source_view` gives it, by contact id: what that source needs after a restart (its
        own, or the hub's) to go on with its calls without popping anyone twice, and to end
        the calls that ended while it was away. A cluster reads them from its KV bucket."""
        if self.clustered:
            try:
                states = await self.delivery.open_from(origin)  # type: ignore[attr-defined]
            except Exception as exc:
                raise JournalUnavailable(exc) from exc
        else:
            states = self.contacts.open_states(origin)
        return sorted((source_view(s) for s in states), key=lambda v: v["contact_id"])

    async def open_contacts_frame(self, conn: HubConnection, origin: str, ref: Any) -> None:
        """An `open_contacts` frame from a source on the listener port."""
        try:
            conn.reply(ref, contacts=await self.open_contacts(origin))
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
    def unavailable(self) -> str | None:
        """Why this hub cannot accept pops now (its health check says so, and a load balancer
        sends the sources elsewhere), or None."""
        if self.clustered and not self.delivery.link()["connected"]:  # type: ignore[attr-defined]
            return "not connected to NATS (reconnecting): pops and contact events get 503"
        return None

    def status(self) -> dict[str, Any]:
        listeners = [
            {"media": media, "resource": resource, "connections": count}
            for (media, resource), count in self.delivery.routing.counts()
        ]
        counters = dict(self.counters)
        counters.update(self.delivery.counters())
        counters["duplicate_events"] = (
            self._contacts.event_ids.duplicates if self._contacts is not None else 0
        )
        return {
            "version": _version(),
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "port": self.port,
            "http_port": self.http_port,
            "journal": self.config.journal,
            "backend": self.config.backend,
            **({"nats": self.delivery.link()} if self.clustered else {}),  # type: ignore[attr-defined]
            "connections": len(self.connections),
            "registrations": sum(len(c.keys) for c in self.connections),
            "browser_streams": len(self.browser_streams),
            "listeners": listeners,
            "pending": len(self.delivery.pending) - self.delivery.changes_pending,
            "contacts": len(self._contacts) if self._contacts is not None else 0,
            "counters": counters,
        }


def _past_refusal(
    tracker: Any,
    events: Any,
    exc: Exception,
    refusal: type[Exception],
    skip: bool,
    origin: str | None = None,
) -> tuple[list[Any], list[Exception]]:
    """The outcomes of a batch the tracker stopped at a refused event (`exc`), and the refusals:
    with `skip`, the events after each refused one are applied too, in order (each refusal's
    index made the batch's)."""
    outcomes = list(getattr(exc, "applied", []))
    refused = [exc]
    start = getattr(exc, "index", None)
    now = datetime.now(UTC)
    while skip and isinstance(events, list) and start is not None and start + 1 < len(events):
        start += 1
        try:
            outcomes += tracker.apply_batch(events[start:], now, origin)
            break
        except refusal as more:
            outcomes += getattr(more, "applied", [])
            refused.append(more)
            if getattr(more, "index", None) is None:
                break
            more.index += start  # type: ignore[attr-defined]
            start = more.index  # type: ignore[attr-defined]
    return outcomes, refused


def _stream_writes(outcome: Any) -> list[list[Any]]:
    """What an applied event writes to the stream, in order (its updates, the withdrawals of an
    `ended`, its pops), as JSON for its contact's KV state: a resend of the event, to any hub,
    writes them again (backend nats). The pops' ids are their message ids: stored twice within
    the duplicate window, JetStream keeps one."""
    entries: list[list[Any]] = [
        ["change", change.to_dict(), change.takes_back] for change in outcome.changes
    ]
    if outcome.ended:
        entries.append(["end"])
    entries += [["pop", event.to_dict()] for event in outcome.pops]
    return entries


REPLAY_SHARE = 0.8  # of the duplicate window: a write older than this is not written again


def _stamped(state: dict[str, Any]) -> dict[str, Any]:
    """The writes recorded in a contact's KV state (event id → `[at, writes, stamped]`), each
    timed from when JetStream stored the revision that first held it: none of its writes went
    to the stream before, even if that store came long after the hub applied the event (its
    answer lost, a quorum back late). That revision is the one read when `stamped` is 0 (the
    hub that next writes the state keeps the stamp)."""
    recorded = dict(state.get("writes") or {})
    stored_at = state.get("stored_at")
    if not isinstance(stored_at, (int, float)):
        return recorded
    for event_id, record in recorded.items():
        if isinstance(record, list) and len(record) == 3 and record[2] == 0:
            recorded[event_id] = [stored_at, record[1], 1]
    return recorded


def _replayable(record: Any, now: float, window: float) -> list[list[Any]]:
    """An event's recorded writes (`[at, writes, stamped]`), if they can still be written again
    without a second copy: JetStream's duplicate window (on its own clock) must still hold the
    first, which can only have been written after `at`."""
    if not isinstance(record, list) or len(record) not in (2, 3):
        return []
    at, entries = record[0], record[1]
    if not isinstance(at, (int, float)) or now - at >= window * REPLAY_SHARE:
        return []
    return [e for e in entries if isinstance(e, list) and e and e[0] in ("change", "end", "pop")]


def _still_replayable(recorded: dict[str, Any], now: float, window: float) -> dict[str, Any]:
    """The recorded writes a resend could still replay (`_replayable`): the rest leave the
    state; at most EVENT_IDS_KEPT events, the latest."""
    kept = {
        event_id: record
        for event_id, record in recorded.items()
        if isinstance(record, list) and record and now - record[0] < window * REPLAY_SHARE
    }
    return dict(list(kept.items())[-EVENT_IDS_KEPT:])


def _failure(futures: Any) -> BaseException | None:
    """The first failure among done futures (a cancelled one counts), else None."""
    for future in futures:
        if future.cancelled():
            return RuntimeError("an earlier request about the contact was cancelled")
        if future.exception() is not None:
            return future.exception()
    return None


def _unavailable(cause: Any) -> JournalUnavailable:
    """A request's own JournalUnavailable (503), with nothing applied, from a failed commit (the
    batch's error is shared by all its requests) or the exception itself."""
    if isinstance(cause, asyncio.Future):
        cause = _failure([cause])
    root = getattr(cause, "__cause__", None) or cause  # what the journal said (the disk is full)
    refused = JournalUnavailable(root)
    refused.__cause__ = root
    refused.applied_result = {"applied": 0, "pops": []}  # type: ignore[attr-defined]
    return refused


def _forget_events(tracker: Any, outcomes: list[Any]) -> None:
    """Event ids of outcomes that did not happen: a resend of them applies."""
    for outcome in outcomes:
        if outcome.event_id is not None and not outcome.duplicate:
            tracker.event_ids.forget(outcome.event_id)


def _contact_ids(events: Any) -> set[str]:
    """The contact ids a request names (what it may change), without checking anything else."""
    if events.__class__ is dict:  # one event, the usual request
        contact_id = events.get("contact_id")
        return {contact_id} if isinstance(contact_id, str) else set()
    items = [events] if isinstance(events, dict) else events if isinstance(events, list) else []
    return {
        item["contact_id"]
        for item in items
        if isinstance(item, dict) and isinstance(item.get("contact_id"), str)
    }


def _version() -> str:
    from .. import __version__

    return __version__


def default_journal_path() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("spop", appauthor=False)) / "journal.sqlite3"
