"""Delivery on NATS JetStream: several hubs share pops, acks and contact state; none is a single
point of failure. The sibling of InProcessDelivery, chosen by `[hub] backend = "nats"`.

One stream (`SPOP` by default, replicated `nats_replicas` times) holds, per (media, resource) key:

- `spop.pop.<media>.<res>`  a pop (the frame; `Nats-Msg-Id` = pop id: JetStream's duplicate window),
                            or a contact update (protocol 2 `change` frame, header `Spop-Change`)
- `spop.acks`               listeners of one hub handled the pops <body> (an orjson list of ids,
                            any keys): the acks of one tick (ACK_TICK), one stored message
- `spop.end.<media>.<res>`  contact <body> ended: its earlier pops of the key are withdrawn
- `spop.ack.<media>.<res>`  one ack per message, as hubs before batched acks wrote it: still read

`<res>` is the resource in URL-safe base64 (no `.`, `*`, `>` or space can reach a subject).

Every hub follows the stream live with one ordered consumer (no per-key consumers: they cost a
Raft group each, and JetStream caps them at 1,000 per stream by default). Its data messages and
JetStream's answers to writes are read straight off nats-py's parser (_direct_reads). A hub keeps in memory
only the keys its own listeners registered: the first registration of a key reads the key's
history (direct gets, `next_by_subj`), so a listener that moved from a hub that died gets every
pop it had not acked. Acks go into the stream, so the pop leaves every hub's window: a hub
gathers the acks of ACK_TICK into one message (half the stored messages of one per ack, and
every hub reads every one), published with a reply subject, counted once JetStream stored it,
and sent again until it is. A pop the listener handled but whose ack was lost comes again: its
handled-id memory runs nothing twice.

The acks are not on the key's subject, so every hub keeps the ids acked within pop_ttl with the
stream sequence of their ack (read from the stream at start, then live); a key's history read
drops each pop at its ack's place, and first reads the ack batches the live consumer has not
brought yet (it may lag, or wait to resume after a reconnect).

A contact update rides the same subject as the key's pops, after them in the stream. One that
takes back (`Spop-Change: take-back`: answered elsewhere, ended) becomes `withdrawn` on every hub
holding the key if the contact's pop of the key is still pending there at that point of the
stream, exactly as the embedded hub decides at that point of its journal.

The hub that accepted a pop keeps its id until it is acked, withdrawn or expired (it sees every
ack and end live): it counts and logs the expiry once, even when no hub had a listener of the key.

Contact state lives in a KV bucket, updated with the revision it was read at (compare-and-set),
so any hub can take the next event of any contact.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import ssl
import time
from collections.abc import Container
from typing import TYPE_CHECKING, Any

import orjson

from ..protocol import change_frame
from .delivery import Pending, Subscriber, sent_phrase, unindex
from .routing import Key, Routing

if TYPE_CHECKING:
    from .server import HubConfig

KINDS = ("pop", "ack", "end")
ACKS = "spop.acks"  # the acked pop ids of one hub's tick, any keys: an orjson list
ACK_TICK = 0.02  # s: a hub gathers the acks of this long into one stored message
ACK_BATCH = 1000  # ids: a batch this full goes out at once
_UNSEEN = 1 << 62  # the stream sequence of an ack sent from here and not yet back
CHANGE = "Spop-Change"  # header of a contact update: "1", or TAKE_BACK
TAKE_BACK = "take-back"  # withdraws the contact's pending pop of the key (sent as `withdrawn`)


def resource_token(resource: str) -> str:
    """The resource as one subject token: URL-safe base64 of its UTF-8, unpadded."""
    return base64.urlsafe_b64encode(resource.encode()).rstrip(b"=").decode() or "_"


def token_resource(token: str) -> str:
    if token == "_":
        return ""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()


def subject(kind: str, key: Key) -> str:
    return f"spop.{kind}.{key[0]}.{resource_token(key[1])}"


def kv_key(contact_id: str) -> str:
    """KV keys allow `[-/_=.a-zA-Z0-9]`: a contact id of any characters, encoded."""
    return "c" + base64.urlsafe_b64encode(contact_id.encode()).decode()


class NatsUnavailable(Exception):
    """JetStream did not acknowledge in time (no quorum, no server reachable). `answer`: what
    the source is told (the 503's message), when it is not "nothing was accepted; retry later"."""

    def __init__(self, why: str, answer: str | None = None, config: bool = False) -> None:
        super().__init__(why)
        self.answer = answer
        self.config = config  # a setting is at fault (exit status 12), not a node's state


def _refusal(exc: BaseException) -> bool:
    """The server refused the client (token, credentials): trying again will not help."""
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text


def _describe(exc: BaseException) -> str:
    """nats-py's errors, in one phrase: `nats: 'Authorization Violation'` → the quoted part."""
    text = str(exc).strip()
    if text.startswith("nats: "):
        text = text[6:].strip("'")
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return text or type(exc).__name__


async def _answers(url: str) -> int:
    """1 if something listens at the nats:// URL's host and port (within 1 s), else 0."""
    from urllib.parse import urlsplit

    parts = urlsplit(url if "://" in url else f"nats://{url}")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 4222), 1
        )
    except (OSError, TimeoutError):
        return 0
    writer.close()
    return 1


NOT_CONNECTED = (
    "this hub is not connected to NATS (reconnecting): nothing was accepted; retry later, "
    "or on another hub"
)


def _no_answer(timeout: float) -> NatsUnavailable:
    """A write JetStream did not answer while connected: it may be stored all the same."""
    return NatsUnavailable(
        f"JetStream did not answer in {timeout:g} s",
        f"JetStream did not answer in {timeout:g} s: the pop may still be stored; resend it "
        "with the same id (stored once)",
    )


class _KeyState:
    """What a hub holds for one key its listeners registered."""

    __slots__ = ("seq", "buffer", "synced")

    def __init__(self) -> None:
        self.seq = 0  # last stream sequence applied for this key
        self.buffer: list[tuple[int, str, bytes, dict[str, str]]] | None = []  # live, while syncing
        self.synced = False


class _Ack:
    """Acks gathered in one tick, then published as one message until JetStream confirms it."""

    __slots__ = ("ids", "data", "sent", "until", "failed")

    def __init__(self, sent: float, until: float) -> None:
        self.ids: list[str] = []
        self.data: bytes | None = None  # set when the tick ends and the message goes out
        self.sent = sent  # time.monotonic() of the last send
        self.until = until  # its pops have expired by then: no use sending it any more
        self.failed = False  # counted once in ack_failures


class NatsDelivery:
    """Pops in a JetStream stream; this hub delivers those of the keys registered here."""

    def __init__(self, config: HubConfig, log: logging.Logger | None = None) -> None:
        self.config = config
        self.ttl = config.pop_ttl
        self.dedupe_window = config.dedupe_window
        self.log = log or logging.getLogger("spop.hub")
        self.stream = config.nats_stream
        self.routing = Routing()
        self.pending: dict[str, Pending] = {}
        self._by_key: dict[Key, dict[str, None]] = {}
        self._by_contact: dict[str, dict[str, None]] = {}
        self._keys: dict[Key, _KeyState] = {}
        # contact → keys it has pops for (from every pop in the stream): what `ended` withdraws
        self._contact_keys: dict[str, dict[Key, float]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.nc: Any = None
        self.js: Any = None
        self.kv: Any = None
        self.replicas = config.nats_replicas  # the stream's, once joined
        self._live: Any = None
        self.last_seq = 0
        self.delivered = 0
        self.acked = 0
        self.expired = 0
        self.withdrawn = 0
        self.duplicates = 0
        self.resyncs = 0
        # contact updates: pending here (for keys registered here), written by connections,
        # acked by a listener here, expired (counted by the hub that accepted them)
        self.changes_pending = 0
        self.changes_delivered = 0
        self.changes_acked = 0
        self.changes_expired = 0
        # pops and changes this hub accepted, until acked, withdrawn or expired anywhere:
        # id → (key, expires, contact id, is a change); it counts and logs their expiry
        self._mine: dict[str, tuple[Key, float, str, bool]] = {}
        self._mine_by_contact: dict[str, dict[str, None]] = {}
        # writes (pops, updates, ends) and acks: queued this loop iteration, then published
        # together by one task, each with a reply subject JetStream answers on (by token)
        self._outbox: list[tuple[str, bytes, dict[str, str] | None, str]] = []
        self._writes: dict[str, asyncio.Future[bool]] = {}  # token "w…" → its writer's future
        self._acks_out: dict[str, _Ack] = {}  # token "a…" → the acks until stored
        self._ack_batch: tuple[str, _Ack] | None = None  # this tick's acks, gathering
        # every pop id acked in the stream (by any hub) within pop_ttl → (when to forget it,
        # the ack's stream sequence): a key's history read drops each at its ack's place (the
        # acks are not on the key's subject)
        self._acked: dict[str, tuple[float, int]] = {}
        self._resources: dict[str, str] = {}  # subject token → resource
        self._acks_loaded: asyncio.Event | None = None
        self._inbox = ""
        self._inbox_sub: Any = None
        self._token = 0
        self.acks_stored = 0  # confirmed by JetStream
        self.ack_failures = 0  # not confirmed in nats_timeout, or refused, at least once

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, make sure the stream and the bucket exist, follow the stream from now."""
        try:
            import nats
            from nats.js.api import DeliverPolicy, KeyValueConfig, StorageType, StreamConfig
        except ImportError:
            raise NatsUnavailable(
                "backend = \"nats\" needs nats-py: pip install 'spop[nats]'", config=True
            ) from None

        c = self.config
        options: dict[str, Any] = {
            "servers": [s.strip() for s in c.nats_servers.split(",") if s.strip()],
            "name": "spop-hub",
            "dont_randomize": True,  # the first that answers, in the order given (nats-py shuffles)
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "connect_timeout": 2,
            # nothing buffered while reconnecting: a write then fails at once (the source is
            # told nothing was accepted), never goes out later behind its 503
            "pending_size": 0,
            # a link that goes silent (a partition that drops packets, no reset) is found by
            # its unanswered pings within about 3 x nats_timeout, then reconnected elsewhere
            "ping_interval": max(c.nats_timeout, 0.5),
            "max_outstanding_pings": 2,
            "reconnected_cb": self._reconnected,
            "disconnected_cb": self._disconnected,
            "error_cb": self._error,
        }
        if c.nats_token:
            options["token"] = c.nats_token
        if c.nats_creds:
            options["user_credentials"] = c.nats_creds
        if c.nats_tls_ca or c.nats_tls_cert:
            context = ssl.create_default_context(cafile=c.nats_tls_ca)
            if c.nats_tls_cert:
                context.load_cert_chain(c.nats_tls_cert, c.nats_tls_key)
            options["tls"] = context
        self.nc = await self._connect(nats, options)
        try:
            await self._join(DeliverPolicy, KeyValueConfig, StorageType, StreamConfig)
        except BaseException as exc:
            nc, self.nc = self.nc, None
            try:  # no reconnection loop left behind a hub that did not start
                await nc.close()
            except Exception:
                pass
            if isinstance(exc, NatsUnavailable) or not isinstance(exc, Exception):
                raise
            raise await self._join_failed(exc) from None

    async def _connect(self, nats: Any, options: dict[str, Any]) -> Any:
        """The first connection, within 2 × nats_timeout (reconnections then go on for ever).
        A refused one says why: nats-py reports it only to error_cb, and retries."""
        c = self.config
        errors: list[Exception] = []
        refused = asyncio.get_running_loop().create_future()

        async def starting(exc: Exception) -> None:
            errors.append(exc)
            if _refusal(exc) and not refused.done():  # a wrong token is not worth waiting on
                refused.set_result(exc)

        options = {**options, "error_cb": starting}
        connecting = asyncio.ensure_future(nats.connect(**options))
        await asyncio.wait(
            {connecting, refused}, timeout=2 * c.nats_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if connecting.done() and connecting.exception() is None:
            nc = connecting.result()
            nc._error_cb = self._error  # from now on, the hub's log
            return nc
        connecting.cancel()
        try:
            await connecting
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                errors.append(exc)
        auth = "hub.nats_creds" if c.nats_creds else "hub.nats_token"
        if refused.done():
            raise NatsUnavailable(
                f"{auth}: NATS at {c.nats_servers} refused the connection: "
                f"{_describe(refused.result())}",
                config=True,
            )
        last = next((e for e in reversed(errors) if not isinstance(e, ConnectionError)), None)
        last = last or (errors[-1] if errors else None)
        if last is None:
            raise NatsUnavailable(
                f"no NATS server answers at {c.nats_servers} within {2 * c.nats_timeout:g} s"
            )
        raise NatsUnavailable(
            f"no NATS server answers at {c.nats_servers} within {2 * c.nats_timeout:g} s "
            f"(last error: {_describe(last)})"
        )

    async def _join_failed(self, exc: Exception) -> NatsUnavailable:
        """What a failure to set up the stream, the bucket or the consumer means."""
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.errors import APIError, ServiceUnavailableError

        c = self.config
        if isinstance(
            exc, NatsTimeout | NoRespondersError | ServiceUnavailableError | TimeoutError
        ):
            servers = [u.strip() for u in c.nats_servers.split(",") if u.strip()]
            up = 0
            for url in servers:
                up += await _answers(url)
            why = (
                f"no answer within {c.nats_timeout:g} s"
                if isinstance(exc, NatsTimeout | TimeoutError)
                else f"no JetStream server answered ({_describe(exc)})"
            )
            return NatsUnavailable(
                f"JetStream has no quorum ({up} of the {len(servers)} nodes of nats_servers "
                f"answer): {why}; start the other nodes"
            )
        if isinstance(exc, APIError):
            return NatsUnavailable(
                f"JetStream refused to set up the stream {self.stream} or the bucket "
                f"{c.nats_kv_bucket}: {exc.description} (code {exc.err_code})",
                config=True,
            )
        return NatsUnavailable(f"JetStream set-up failed: {_describe(exc)}")

    async def _join(
        self, DeliverPolicy: Any, KeyValueConfig: Any, StorageType: Any, StreamConfig: Any
    ) -> None:
        """Make sure the stream and the bucket exist, follow the stream from now."""
        c = self.config
        self.js = self.nc.jetstream(timeout=c.nats_timeout)
        self._inbox = self.nc.new_inbox()
        self._inbox_sub = await self.nc.subscribe(self._inbox + ".*", cb=self._on_reply)
        max_age = max(self.ttl, self.dedupe_window, 1.0)
        stream = StreamConfig(
            name=self.stream,
            subjects=[f"spop.{kind}.>" for kind in KINDS] + [ACKS],
            num_replicas=c.nats_replicas,
            max_age=max_age,
            duplicate_window=min(max(self.dedupe_window, 0.1), max_age),
            allow_direct=True,
            storage=StorageType.FILE,
        )
        await self._ensure_stream(stream)
        await self._ensure_bucket(
            KeyValueConfig(
                bucket=c.nats_kv_bucket,
                history=1,
                ttl=max(c.contact_idle_expiry, 60.0),
                replicas=c.nats_replicas,
                storage=StorageType.FILE,
            )
        )
        info = await self.js.stream_info(self.stream)
        self.last_seq = info.state.last_seq
        self._live = await self.js.subscribe(
            "spop.>",
            stream=self.stream,
            cb=self._on_live,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            idle_heartbeat=1.0,
        )
        self._direct_reads()
        # the acks stored before the live consumer began: read once; key reads wait for them
        self._acks_loaded = asyncio.Event()
        self._spawn(self._load_acks())
        self.log.info(
            "JetStream stream %s (replicas %d) at sequence %d via %s",
            self.stream,
            self.replicas,
            self.last_seq,
            self.nc.connected_url.netloc if self.nc.connected_url else "?",
        )

    async def _ensure_stream(self, ours: Any) -> None:
        """Create the shared stream, or join it. A hub never lowers what the stream keeps
        (max_age, duplicate_window, replicas): the other hubs count on it; it raises what it
        needs more of, and logs what it asked for and did not get."""
        from nats.js.errors import BadRequestError, NotFoundError

        try:
            info = await self.js.stream_info(self.stream)
        except NotFoundError:
            try:
                await self.js.add_stream(ours)
                self.replicas = ours.num_replicas
                return
            except BadRequestError as exc:
                if exc.err_code == 10065:  # subjects overlap with an existing stream
                    raise NatsUnavailable(
                        f"hub.nats_stream: the subjects spop.> are taken by another stream than "
                        f"{self.stream} (another nats_stream name?): one spop cluster per NATS "
                        "account; give every hub the same nats_stream, or use another account",
                        config=True,
                    ) from None
                if exc.err_code != 10058:  # not "created by another hub meanwhile"
                    raise
            info = await self.js.stream_info(self.stream)
        have = info.config
        wanted, kept = {}, []
        for name, setting, unit in (
            ("max_age", "pop_ttl/dedupe_window", " s"),
            ("duplicate_window", "dedupe_window", " s"),
            ("num_replicas", "nats_replicas", ""),
        ):
            mine, theirs = getattr(ours, name), getattr(have, name) or 0
            if name == "max_age" and not theirs:  # 0: kept for ever
                continue
            if mine > theirs:
                wanted[name] = mine
            elif mine < theirs:
                kept.append(
                    f"{name.removeprefix('num_')} {theirs:g}{unit} (this hub's {setting} asks "
                    f"{mine:g}{unit})"
                )
        if not have.allow_direct:
            wanted["allow_direct"] = True
        subjects = list(have.subjects or ())
        for subj in ours.subjects:
            if subj not in subjects:
                subjects.append(subj)
        if len(subjects) != len(have.subjects or ()):
            wanted["subjects"] = subjects
        if kept:
            self.log.warning(
                "stream %s keeps %s: a hub never lowers the shared stream; change it with "
                "`nats stream edit %s`",
                self.stream,
                ", ".join(kept),
                self.stream,
            )
        self.replicas = int(wanted.get("num_replicas", have.num_replicas or 1))
        if wanted:
            config = dataclasses.replace(have, **wanted)
            if config.duplicate_window > (config.max_age or config.duplicate_window):
                config.duplicate_window = config.max_age
            self.log.warning(
                "stream %s: raising %s for this hub",
                self.stream,
                ", ".join(f"{k} to {v}" for k, v in wanted.items()),
            )
            await self.js.update_stream(config)

    async def _ensure_bucket(self, ours: Any) -> None:
        """Create the contacts' KV bucket, or bind to it as it is (another hub made it, maybe
        with another contact_idle_expiry or replicas: a warning, not a crash)."""
        from nats.js.errors import BadRequestError

        try:
            self.kv = await self.js.create_key_value(ours)
            return
        except BadRequestError as exc:
            if exc.err_code != 10058:  # "stream name already in use with a different config"
                raise
        self.kv = await self.js.key_value(ours.bucket)
        status = await self.kv.status()
        have = status.stream_info.config
        differs = [
            f"{label} {theirs:g}{unit} (this hub's {setting} asks {mine:g}{unit})"
            for label, setting, unit, theirs, mine in (
                ("ttl", "contact_idle_expiry", " s", have.max_age or 0, ours.ttl),
                ("replicas", "nats_replicas", "", have.num_replicas or 1, ours.replicas),
            )
            if theirs != mine
        ]
        if differs:
            self.log.warning(
                "KV bucket %s keeps %s: the bucket is shared; change it with `nats kv edit %s`",
                ours.bucket,
                ", ".join(differs),
                ours.bucket,
            )

    async def _load_acks(self) -> None:
        """Read the ack batches already in the stream into `_acked` (those after the live
        consumer began come live). One direct read for the last, then an ordered consumer."""
        from nats.js.api import DeliverPolicy

        assert self._acks_loaded is not None
        while True:
            try:
                reply = await self.nc.request(
                    f"$JS.API.DIRECT.GET.{self.stream}",
                    orjson.dumps({"last_by_subj": ACKS}),
                    timeout=self.config.nats_timeout,
                )
                headers = reply.headers or {}
                status = headers.get("Status")
                if status and status != "404":
                    raise NatsUnavailable(f"status {status}")
                last = 0 if status else int(headers["Nats-Sequence"])
                break
            except Exception as exc:
                self.log.warning("reading the last acks from JetStream: %r; retrying", exc)
                await asyncio.sleep(0.25)
        if last:
            done = asyncio.get_running_loop().create_future()
            until = time.monotonic() + self.ttl

            async def on_batch(msg: Any) -> None:
                at = _stream_seq(msg.reply)
                try:
                    for pop_id in orjson.loads(msg.data):
                        self._acked.setdefault(pop_id, (until, at))
                except Exception:
                    self.log.exception("ack batch in JetStream unreadable; skipped")
                if (at >= last or _stream_pending(msg.reply) == 0) and not done.done():
                    done.set_result(None)

            while True:
                try:
                    sub = await self.js.subscribe(
                        ACKS,
                        stream=self.stream,
                        cb=on_batch,
                        ordered_consumer=True,
                        deliver_policy=DeliverPolicy.ALL,
                        idle_heartbeat=1.0,
                    )
                    break
                except Exception as exc:
                    self.log.warning("reading the acks from JetStream: %r; retrying", exc)
                    await asyncio.sleep(0.25)
            try:
                while not done.done():
                    try:
                        await asyncio.wait_for(asyncio.shield(done), 1.0)
                    except TimeoutError:  # the last batch may have expired meanwhile
                        try:
                            if (await sub.consumer_info()).num_pending == 0:
                                break
                        except Exception:
                            pass
            finally:
                try:
                    await sub.unsubscribe()
                except Exception:
                    pass
        self._acks_loaded.set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._live is not None:
            try:
                await self._live.unsubscribe()
            except Exception:
                pass
            self._live = None
        if self.nc is not None:
            try:  # the acks still queued or buffered go out; no drain: it waits on every subscription
                self._seal_acks()
                if self._outbox:
                    await self._publish(self._take_outbox())
                await self.nc.flush(timeout=1)
            except Exception:
                pass
            await self.nc.close()
            self.nc = None

    async def _reconnected(self) -> None:
        # the ordered consumer resumes by itself; the direct reads of a sync in progress may
        # have failed: read every registered key again
        self.log.warning("NATS: reconnected to %s", self.nc.connected_url.netloc)
        for key in list(self._keys):
            self._resync(key)

    async def _disconnected(self) -> None:
        self.log.warning("NATS: disconnected")

    async def _error(self, exc: Exception) -> None:
        if self.nc is not None and not self.nc.is_connected and "OutboundBuffer" in repr(exc):
            # nats-py's ordered consumer retrying while we reconnect: nothing to tell
            self.log.debug("NATS: %r", exc)
            return
        self.log.warning("NATS: %r", exc)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- listeners ------------------------------------------------------------------------
    def subscribe(self, key: Key, subscriber: Subscriber) -> bool:
        """Register; the subscriber is owed the key's pending pops (once the key's history is
        read, for the first registration of a key on this hub)."""
        if not self.routing.add(key, subscriber):
            return False
        state = self._keys.get(key)
        if state is None:
            self._keys[key] = _KeyState()
            self._spawn(self._sync(key))
        elif state.synced:
            owed = list(self._by_key.get(key, ()))
            if owed:
                subscriber.owe(owed)
        return True

    def unsubscribe(self, key: Key, subscriber: Subscriber) -> bool:
        removed = self.routing.remove(key, subscriber)
        if removed and not any(True for _ in self.routing.of(key)):
            self._drop_key(key)  # no listener here any more: another hub may serve it
        return removed

    def _drop_key(self, key: Key) -> None:
        self._keys.pop(key, None)
        for pop_id in list(self._by_key.pop(key, ())):
            pending = self.pending.pop(pop_id, None)
            if pending is not None:
                unindex(pending, {}, self._by_contact)  # the key's index is gone already

    def _resync(self, key: Key) -> None:
        """Read the key's history again (after a NATS reconnect)."""
        if key not in self._keys:
            return
        self.resyncs += 1
        state = self._keys[key] = _KeyState()
        state.seq = 0
        self._spawn(self._sync(key, again=True))

    async def _next(self, seq: int, subjects: str, what: str, alive: Any) -> Any:
        """The first message at or after `seq` on `subjects` (a direct read), None at the end
        or once `alive()` is false; retried while JetStream does not answer."""
        while alive():
            try:
                reply = await self.nc.request(
                    f"$JS.API.DIRECT.GET.{self.stream}",
                    orjson.dumps({"seq": seq, "next_by_subj": subjects}),
                    timeout=self.config.nats_timeout,
                )
            except Exception as exc:
                self.log.warning("reading %s from JetStream: %r; retrying", what, exc)
                await asyncio.sleep(0.25)
                continue
            status = (reply.headers or {}).get("Status")
            if not status:
                return reply
            if status == "404":
                return None
            self.log.warning("reading %s: status %s; retrying", what, status)
            await asyncio.sleep(0.25)
        return None

    async def _catch_up_acks(self, seq: int, alive: Any) -> int:
        """Apply the ack batches from `seq` on that the live consumer has not brought yet (it
        may lag, or wait to resume after a reconnect); they come live again later, harmlessly.
        Returns the sequence to read from next time."""
        seq = max(seq, self.last_seq + 1)
        while (reply := await self._next(seq, ACKS, "acks", alive)) is not None:
            at = int(reply.headers["Nats-Sequence"])
            self._acks_in(orjson.loads(reply.data), at)
            seq = at + 1
        return seq

    async def _sync(self, key: Key, again: bool = False) -> None:
        """Apply the key's history from the stream, then what came live meanwhile; owe it.
        Acks are not on the key's subject: those the live consumer has not brought yet are
        read before and after the key's messages."""
        state = self._keys.get(key)
        if state is None:
            return
        if self._acks_loaded is not None:
            await self._acks_loaded.wait()

        def alive() -> bool:
            return self._keys.get(key) is state

        acks_seq = await self._catch_up_acks(0, alive)
        pattern = f"spop.*.{key[0]}.{resource_token(key[1])}"
        seen = set(self._by_key.get(key, ())) if again else set()
        seq = 1
        what = f"{key[0]} {key[1]}"
        while (reply := await self._next(seq, pattern, what, alive)) is not None:
            headers = reply.headers
            at = int(headers["Nats-Sequence"])
            kind = headers["Nats-Subject"].split(".", 2)[1]
            self._settle_acked(key, at)
            self._apply(key, state, at, kind, reply.data, headers, live=False)
            seq = at + 1
        if alive():
            await self._catch_up_acks(acks_seq, alive)
        if self._keys.get(key) is not state:
            return
        buffered, state.buffer = state.buffer or [], None
        for at, kind, data, headers in buffered:
            self._settle_acked(key, at)
            self._apply(key, state, at, kind, data, headers, live=False)
        self._settle_acked(key, None)
        state.synced = True
        owed = [pop_id for pop_id in self._by_key.get(key, ()) if pop_id not in seen]
        if owed:
            for subscriber in self.routing.of(key):
                subscriber.owe(owed)

    # -- the stream, live -----------------------------------------------------------------
    async def _on_live(self, msg: Any) -> None:
        """nats-py's callback: what the direct path (_direct_reads) passes on to it."""
        self._on_message(_stream_seq(msg.reply), msg.subject, msg.data, msg.headers or {})

    def _on_message(self, at: int, subj: str, data: bytes, headers: dict[str, str]) -> None:
        """One message of the stream, live, in order."""
        try:
            self.last_seq = at
            if subj == ACKS:
                self._acks_in(orjson.loads(data), at)
                return
            _, kind, media, token = subj.split(".", 3)
            key = (media, self._resource(token))
            if kind == "pop":
                change = headers.get(CHANGE)
                if change is None:
                    self._note_contact(
                        headers.get("Spop-Contact", ""), key, _expires(headers, self.ttl)
                    )
                elif change == TAKE_BACK and self._mine_by_contact:
                    self._settle_mine(headers.get("Spop-Contact", ""), key)
            elif kind == "ack":  # one ack on the key's subject (a hub before batched acks)
                self._acks_in([data.decode(errors="replace")], at)
                return
            elif self._mine:  # an end: the pops accepted here it settles
                self._settle_mine(data.decode(errors="replace"), key)
            state = self._keys.get(key)
            if state is None:
                return
            if state.buffer is not None:
                state.buffer.append((at, kind, data, headers))
                return
            self._apply(key, state, at, kind, data, headers, live=True)
        except Exception:  # one odd message must not stop the hub following the stream
            self.log.exception("JetStream message %s dropped", subj)

    def _resource(self, token: str) -> str:
        """token_resource, remembered (every hub decodes the key of every message)."""
        resource = self._resources.get(token)
        if resource is None:
            if len(self._resources) >= 100_000:
                self._resources.clear()
            resource = self._resources[token] = token_resource(token)
        return resource

    def _direct_reads(self) -> None:
        """Take the live consumer's data messages and JetStream's answers to writes off
        nats-py's path for them (a header parse into an email-like dict, a Msg object, a queue
        and a task wake per message): parsed here and handled at once, in order. Anything else
        (flow control, heartbeats, an ordered consumer's gap, which nats-py answers by starting
        the consumer again) still goes through nats-py. Off when nats-py's internals differ."""
        client, replies = self.nc, self._inbox_sub
        live = getattr(self._live, "_sub", None)  # the subscription nats-py's client holds
        jsi = getattr(live, "_jsi", None)
        if not all(
            hasattr(o, a)
            for o, a in (
                (client, "_process_msg"),
                (client, "stats"),
                (live, "_id"),
                (live, "_received"),
                (replies, "_id"),
                (jsi, "_dseq"),
                (jsi, "_sseq"),
                (jsi, "track_sequences"),
            )
        ):
            self.log.info("nats-py without the expected internals: messages through its path")
            return
        nats_path = client._process_msg
        on_message, on_reply = self._on_message, self._reply

        log = self.log

        async def process_msg(
            sid: int, subj: bytes, reply: bytes, data: bytes, headers: bytes | None
        ) -> None:
            if sid == replies._id:  # JetStream's answer to a write or an ack
                status = ""
                if headers and headers[8:9] == b" ":  # NATS/1.0 503
                    status = headers[9:12].decode(errors="replace")
                try:  # nothing of ours may escape into nats-py's read loop
                    on_reply(subj.decode(errors="replace"), data, status)
                except Exception:
                    log.exception("JetStream answer on %r dropped", subj)
                return
            tokens = reply.split(b".") if sid == live._id and reply[:8] == b"$JS.ACK." else ()
            if len(tokens) != 9 or int(tokens[6]) != jsi._dseq:  # a gap: nats-py resets
                return await nats_path(sid, subj, reply, data, headers)
            try:  # nothing of ours may escape into nats-py's read loop
                jsi._dseq += 1
                sseq = jsi._sseq = int(tokens[5])
                jsi._active = True
                jsi.track_sequences(reply.decode())  # its heartbeats compare with the last one
                live._received += 1
                stats = client.stats
                stats["in_msgs"] += 1
                stats["in_bytes"] += len(data)
                subject_ = subj.decode(errors="replace")
                on_message(sseq, subject_, data, _headers(headers) if headers else {})
            except Exception:
                log.exception("JetStream message %r dropped", subj)

        client._process_msg = process_msg

    def _acks_in(self, ids: list[str], at: int) -> None:
        """Acks in the stream at sequence `at`, of any keys: their pops leave this hub's
        window (a key whose history is being read drops them at their place in it)."""
        entry = (time.monotonic() + self.ttl, at)
        acked, pending, mine = self._acked, self.pending, self._mine
        for pop_id in ids:
            acked[pop_id] = entry
            p = pending.get(pop_id)
            if p is not None:
                state = self._keys.get(p.key)
                if state is None or state.synced:
                    self._forget(pop_id)
            if mine:
                self._drop_mine(pop_id)

    def _settle_acked(self, key: Key, before: int | None) -> None:
        """While reading a key's history: its pending pops acked before sequence `before`
        (any, for None: the history is read) leave the window, as if the acks were there."""
        acked = self._acked
        for pop_id in [
            i
            for i in self._by_key.get(key, ())
            if i in acked and (before is None or acked[i][1] < before)
        ]:
            self._forget(pop_id)

    def _apply(
        self,
        key: Key,
        state: _KeyState,
        at: int,
        kind: str,
        data: bytes,
        headers: dict[str, str],
        live: bool,
    ) -> None:
        if at <= state.seq:
            return
        state.seq = at
        if kind == "pop":
            pop_id = headers.get("Spop-Id") or headers.get("Nats-Msg-Id", "")
            expires = _expires(headers, self.ttl)
            if (
                not pop_id
                or pop_id in self.pending
                or (live and pop_id in self._acked)
                or expires <= time.time()
            ):
                return
            contact_id = headers.get("Spop-Contact", "")
            change = headers.get(CHANGE)
            if change is None:
                pending = Pending(pop_id, key, data, expires, contact_id)
                if contact_id:
                    self._by_contact.setdefault(contact_id, {})[pop_id] = None
            else:  # a contact update: never withdrawn with the contact's pops
                if change == TAKE_BACK:
                    data = self._take_back(contact_id, key, data)
                pending = Pending(pop_id, key, data, expires, contact_id, change=True)
                self.changes_pending += 1
            self.pending[pop_id] = pending
            self._by_key.setdefault(key, {})[pop_id] = None
            if live:
                for subscriber in self.routing.of(key):
                    subscriber.deliver(pending)
        elif kind == "ack":  # read from a key's history (live ones go through _acks_in)
            pop_id = data.decode(errors="replace")
            self._acked[pop_id] = (time.monotonic() + self.ttl, at)
            self._forget(pop_id)
        elif kind == "end":
            contact_id = data.decode(errors="replace")
            for pop_id in list(self._by_contact.get(contact_id, ())):
                pending = self.pending.get(pop_id)
                if pending is not None and pending.key == key:
                    self._forget(pop_id)
                    self.withdrawn += 1

    def _take_back(self, contact_id: str, key: Key, frame: bytes) -> bytes:
        """The contact's pops of `key` still pending are withdrawn; the update then says
        `withdrawn` (the listener never handled the pop), as on the embedded hub."""
        ids = [i for i in self._by_contact.get(contact_id, ()) if self.pending[i].key == key]
        if not ids:
            return frame
        body = orjson.loads(frame)["change"]
        if body["change"] == "ended":
            body["reason"] = "ended"
        body["change"] = "withdrawn"
        for pop_id in ids:
            self._forget(pop_id)
        self.withdrawn += len(ids)
        return change_frame(body)

    def _note_contact(self, contact_id: str, key: Key, expires: float) -> None:
        if contact_id:
            self._contact_keys.setdefault(contact_id, {})[key] = expires

    # -- sources --------------------------------------------------------------------------
    def is_duplicate(self, pop_id: str) -> bool:
        return False  # JetStream's duplicate window decides, at the write

    def remember(self, pop_id: str, accepted: float) -> None:
        """Nothing to do: the stream keeps the ids."""

    def submit(
        self,
        pop_id: str,
        key: Key,
        frame: bytes,
        contact_id: str = "",
        dedupe: bool = True,
        change: bool = False,
        takes_back: bool = False,
    ) -> asyncio.Future[bool]:
        """Write a pop (or a contact update: `change`) to the stream; the future is True once
        JetStream stored it, False for a duplicate within the window, NatsUnavailable if it
        could not be stored. `takes_back`: the update withdraws the contact's pending pop of
        the key (it is then sent as `withdrawn`)."""
        expires = time.time() + self.ttl
        headers = {"Spop-Id": pop_id, "Spop-Expires": f"{expires:.3f}"}
        if contact_id:
            headers["Spop-Contact"] = contact_id
        if change:
            headers[CHANGE] = TAKE_BACK if takes_back else "1"
        else:
            self._note_contact(contact_id, key, expires)  # an `ended` right after withdraws it
        if dedupe:
            headers["Nats-Msg-Id"] = pop_id
        write = self._write(subject("pop", key), frame, headers)
        if pop_id not in self._mine:  # a resend's outcome must not drop the first copy's
            self._mine[pop_id] = (key, expires, contact_id, change)
            if contact_id and not change:
                self._mine_by_contact.setdefault(contact_id, {})[pop_id] = None
            write.add_done_callback(lambda w: _stored(w) or self._drop_mine(pop_id))
        return write

    def _write(
        self, subj: str, data: bytes, headers: dict[str, str] | None
    ) -> asyncio.Future[bool]:
        """Into the stream with this iteration's other writes; the future is True once
        JetStream stored it, False for a duplicate, NatsUnavailable if refused or unanswered
        within nats_timeout. No task and no JSON parsing per write."""
        loop = asyncio.get_running_loop()
        write: asyncio.Future[bool] = loop.create_future()
        self._token += 1
        token = f"w{self._token:x}"
        self._writes[token] = write
        self._queue(subj, data, headers, token)
        return write

    def _queue(self, subj: str, data: bytes, headers: dict[str, str] | None, token: str) -> None:
        if not self._outbox:  # one publishing task per loop iteration
            asyncio.get_running_loop().call_soon(self._send_outbox)
        self._outbox.append((subj, data, headers, token))

    def _take_outbox(self) -> list[tuple[str, bytes, dict[str, str] | None, str]]:
        batch, self._outbox = self._outbox, []
        return batch

    def _send_outbox(self) -> None:
        batch = self._take_outbox()
        if not batch:
            return
        tokens = [token for *_, token in batch if token[0] == "w"]
        if tokens:  # one timer for the writes of the batch
            asyncio.get_running_loop().call_later(
                self.config.nats_timeout, self._unanswered, tokens
            )
        self._spawn(self._publish(batch))

    async def _publish(self, batch: list[tuple[str, bytes, dict[str, str] | None, str]]) -> None:
        inbox, nc = self._inbox, self.nc
        for subj, data, headers, token in batch:
            try:  # refused at once while reconnecting (pending_size 0): nothing is buffered
                await nc.publish(subj, data, reply=f"{inbox}.{token}", headers=headers)
            except Exception as exc:
                if not nc.is_connected:
                    self._failed(token, NatsUnavailable(f"not connected: {exc!r}", NOT_CONNECTED))
                else:
                    self._failed(token, NatsUnavailable(f"JetStream did not store it: {exc!r}"))
                ack = self._acks_out.get(token)
                if ack is not None:  # again at the next sweep once connected (_retry_acks)
                    ack.sent = time.monotonic() - self.config.nats_timeout

    def _failed(self, token: str, error: NatsUnavailable) -> None:
        write = self._writes.pop(token, None)
        if write is not None and not write.done():
            write.set_exception(error)

    def _unanswered(self, tokens: list[str]) -> None:
        for token in tokens:
            if token in self._writes:
                self._failed(token, _no_answer(self.config.nats_timeout))

    async def _on_reply(self, msg: Any) -> None:
        """nats-py's callback: what the direct path (_direct_reads) passes on to it."""
        self._reply(msg.subject, msg.data, (msg.headers or {}).get("Status", ""))

    def _reply(self, subj: str, data: bytes, status: str) -> None:
        """JetStream's answer to a write or an ack (`{"stream":…,"seq":…}`, with
        `"duplicate": true` for a resend; `{"error":…}`, or a 503 status: refused)."""
        token = subj.rpartition(".")[2]
        refused = bool(status) or b'"error"' in data
        if token[0] == "w":
            write = self._writes.pop(token, None)
            if write is None or write.done():  # answered after its timeout
                return
            if refused:  # 503: no JetStream server answered (no quorum, no stream leader)
                why = data.decode(errors="replace") or f"status {status}"
                answer = (
                    f"JetStream has no quorum or stream leader (status {status}): nothing was "
                    "accepted; retry later"
                    if status == "503"
                    else None
                )
                write.set_exception(NatsUnavailable(f"JetStream did not store it: {why}", answer))
            elif b'"duplicate"' in data:  # the server writes `"duplicate": true`
                self.duplicates += 1
                write.set_result(False)
            else:
                write.set_result(True)
            return
        ack = self._acks_out.get(token)
        if ack is None:  # the second answer to an ack sent twice
            return
        if refused:  # 503: no JetStream answered; or an API error
            if not ack.failed:
                ack.failed = True
                self.ack_failures += len(ack.ids)
            # again at the next sweep, not at once: a leader election takes seconds
            ack.sent = time.monotonic() - self.config.nats_timeout
            return
        del self._acks_out[token]
        self.acks_stored += len(ack.ids)

    def publish(self, *args: Any, **kwargs: Any) -> bool:
        raise TypeError("NatsDelivery takes pops through submit()")

    # -- outcomes -------------------------------------------------------------------------
    def ack(self, pop_id: str, keys: Container[Key] | None = None) -> Pending | None:
        """A listener of the pop's key handled it: it leaves the window here at once, and on
        every hub once the ack is in the stream."""
        pending = self.pending.get(pop_id)
        if pending is None or (keys is not None and pending.key not in keys):
            return None
        self._forget(pop_id)
        if pending.change:
            self.changes_acked += 1
        else:
            self.acked += 1
        if self._mine:
            self._drop_mine(pop_id)
        if self.nc is not None:  # with this tick's other acks; confirmed by reply
            now = time.monotonic()
            # handled here: a history read of its key before the ack comes back skips it
            self._acked.setdefault(pop_id, (now + self.ttl, _UNSEEN))
            batch = self._ack_batch
            if batch is None:
                self._token += 1
                token = f"a{self._token:x}"
                batch = self._ack_batch = (token, _Ack(now, now + self.ttl))
                self._acks_out[token] = batch[1]  # owed from now on (close() sends it)
                asyncio.get_running_loop().call_later(ACK_TICK, self._seal_acks, token)
            batch[1].ids.append(pop_id)
            if len(batch[1].ids) >= ACK_BATCH:
                self._seal_acks()
        return pending

    def _seal_acks(self, token: str | None = None) -> None:
        """The tick's acks go out as one message (`token`: only if that batch is the one
        gathering, for the tick's timer)."""
        batch = self._ack_batch
        if batch is None or (token is not None and batch[0] != token):
            return
        self._ack_batch = None
        token, ack = batch
        ack.data = orjson.dumps(ack.ids)
        ack.sent = time.monotonic()
        self._queue(ACKS, ack.data, None, token)

    def _retry_acks(self) -> None:
        """Send again each ack JetStream did not confirm within nats_timeout (same reply token:
        the later of two answers is ignored); drop those whose pop has expired meanwhile."""
        if not self._acks_out or self.nc is None:
            return
        now = time.monotonic()
        timeout = self.config.nats_timeout
        for token, ack in list(self._acks_out.items()):
            if ack.data is None:  # still gathering
                continue
            if now >= ack.until:
                del self._acks_out[token]
                self.log.warning(
                    "acks of pops %s never confirmed by JetStream; given up (the pops expired)",
                    ", ".join(ack.ids),
                )
                continue
            if now - ack.sent < timeout:
                continue
            if not ack.failed:
                ack.failed = True
                self.ack_failures += len(ack.ids)
            if self.nc.is_connected:  # else at the first sweep once connected again
                ack.sent = now
                self._queue(ACKS, ack.data, None, token)

    def withdraw(
        self,
        contact_id: str,
        popped: list[Key] | None = None,
        writes: list[asyncio.Future[bool]] | None = None,
    ) -> list[Pending]:
        """The contact ended: its pops still pending, on any hub, are withdrawn: on the keys its
        state says it popped (`popped`) and those this hub saw pops of it for. The stream
        writes are added to `writes` (to await them).

        The pops pending here are returned but stay until the withdrawal comes back from the
        stream, as on every other hub: the contact's take-back updates, written before it,
        must still find them (and say `withdrawn`), here as there."""
        keys = self._contact_keys.pop(contact_id, {})
        for key in popped or ():
            keys.setdefault(key, 0.0)
        local = [self.pending[i] for i in list(self._by_contact.get(contact_id, ()))]
        for pending in local:
            keys.setdefault(pending.key, 0.0)
        for key in keys:
            write = self._write(subject("end", key), contact_id.encode(), None)
            if writes is not None:
                writes.append(write)
        return local

    def of_contact(self, contact_id: str) -> list[str]:
        return list(self._by_contact.get(contact_id, ()))

    def expire(self) -> list[Pending]:
        """Drop what expired here; count and log (once, here) the expiry of what this hub
        accepted, wherever it was or was not delivered. Returns [] (logged here already).
        Also sends again the acks JetStream has not confirmed."""
        now = time.time()
        expired = {p.id: p for p in self.pending.values() if p.expires <= now}
        for pending in expired.values():
            self._forget(pending.id)
        mine = self._mine
        while mine:  # accepted in order with the same ttl: the oldest expire first
            pop_id, (key, expires, _, change) = next(iter(mine.items()))
            if expires > now:
                break
            self._drop_mine(pop_id)
            if change:  # normal when no listener of its key asked for updates
                self.changes_expired += 1
                self.log.debug("change %s for %s %s expired", pop_id, *key)
                continue
            self.expired += 1
            here = expired.get(pop_id)
            self.log.warning(
                "pop %s for %s %s expired %s after %.0f s",
                pop_id,
                *key,
                sent_phrase(here.sent)
                if here is not None
                else "unacknowledged (no listener of its key on this hub, which accepted it)",
                self.ttl,
            )
        self._retry_acks()
        acked, clock = self._acked, time.monotonic()
        while acked:  # added in time order
            pop_id, (until, _) = next(iter(acked.items()))
            if until > clock:
                break
            del acked[pop_id]
        for contact_id in [
            c for c, keys in self._contact_keys.items() if max(keys.values()) <= now
        ]:
            del self._contact_keys[contact_id]
        return []

    def _drop_mine(self, pop_id: str) -> None:
        entry = self._mine.pop(pop_id, None)
        if entry is not None and entry[2]:
            ids = self._mine_by_contact.get(entry[2])
            if ids is not None:
                ids.pop(pop_id, None)
                if not ids:
                    del self._mine_by_contact[entry[2]]

    def _settle_mine(self, contact_id: str, key: Key) -> None:
        """The contact's pops of `key` accepted here were withdrawn (an end, a take-back)."""
        for pop_id in list(self._mine_by_contact.get(contact_id, ())):
            if self._mine[pop_id][0] == key:
                self._drop_mine(pop_id)

    def _forget(self, pop_id: str) -> Pending | None:
        pending = self.pending.pop(pop_id, None)
        if pending is None:
            return None
        if pending.change:
            self.changes_pending -= 1
        unindex(pending, self._by_key, self._by_contact)
        for subscriber in self.routing.of(pending.key):
            subscriber.settled(pop_id)
        return pending

    # -- contacts in KV ---------------------------------------------------------------------
    async def load_contacts(self, ids: set[str]) -> dict[str, tuple[dict[str, Any] | None, int]]:
        """Each contact's state and the KV revision it was read at (0: no such key). The state
        carries `stored_at`: when JetStream stored that revision (its clock, epoch seconds), so
        that what it records is timed from when it was really stored, however late."""
        from nats.js.errors import NotFoundError

        kv, out = self.kv, {}
        for contact_id in ids:
            try:  # kv.get, with the message's time (nats-py's Entry leaves `created` empty)
                msg = await self.js.get_msg(
                    kv._stream, subject=f"{kv._pre}{kv_key(contact_id)}", direct=kv._direct
                )
            except NotFoundError:
                out[contact_id] = (None, 0)
                continue
            except Exception as exc:
                raise self._kv_failed("contact state unreadable", exc) from exc
            revision = msg.seq or 0
            if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
                out[contact_id] = (None, revision)  # a deleted key: the next write names it
                continue
            state = orjson.loads(msg.data)
            if msg.time is not None:
                state["stored_at"] = msg.time.timestamp()
            out[contact_id] = (state, revision)
        return out

    async def open_from(self, origin: str) -> list[dict[str, Any]]:
        """The stored states of the contacts not ended that the source `origin` started: one
        pass over the bucket's keys (an ordered consumer, last value of each), for a source
        at its start; not a per-request path."""
        why = f"the open contacts of {origin!r} cannot be read now; retry later"
        try:
            watcher = await self.kv.watchall(ignore_deletes=True)
        except Exception as exc:
            raise NatsUnavailable(f"open contacts unreadable: {exc!r}", why) from exc
        found: list[dict[str, Any]] = []
        try:
            while True:
                entry = await watcher.updates(timeout=self.config.nats_timeout * 4)
                if entry is None:  # the end of what was stored when the pass began
                    break
                if not entry.value:
                    continue
                try:
                    state = orjson.loads(entry.value)
                except orjson.JSONDecodeError:
                    continue
                if state.get("origin") == origin and not state.get("ended_seen"):
                    found.append(state)
        except Exception as exc:
            raise NatsUnavailable(f"open contacts unreadable: {exc!r}", why) from exc
        finally:
            try:
                await watcher.stop()
            except Exception:
                pass
        return found

    async def store_contacts(
        self, states: dict[str, dict[str, Any] | None], revisions: dict[str, int]
    ) -> bool:
        """Write each state if its key is still at the revision read (compare-and-set). False
        when another hub changed one meanwhile: the caller reads again and retries."""
        from nats.js.errors import KeyWrongLastSequenceError

        for contact_id, state in states.items():
            key = kv_key(contact_id)
            last = revisions.get(contact_id, 0)
            try:
                if state is None:
                    if last:
                        await self.kv.delete(key, last=last)
                elif last:
                    await self.kv.update(key, orjson.dumps(state), last=last)
                else:
                    await self.kv.create(key, orjson.dumps(state))
            except KeyWrongLastSequenceError:
                return False
            except Exception as exc:
                if "wrong last sequence" in str(exc) or "key exists" in str(exc):
                    return False
                failed = self._kv_failed("contact state not stored", exc)
                if failed.answer is None and isinstance(exc, TimeoutError):
                    failed.ambiguous = True  # type: ignore[attr-defined]
                    failed.answer = (  # sent, unanswered: JetStream may store it late
                        f"JetStream did not answer in {self.config.nats_timeout:g} s: the "
                        "events may still be applied; resend them with the same ids (applied "
                        "once)"
                    )
                raise failed from exc
        return True

    def link(self) -> dict[str, Any]:
        """The stream, its replicas, and the NATS node this hub is connected to (no
        credentials), for the status and the health check."""
        nc = self.nc
        connected = bool(nc is not None and nc.is_connected)
        url = nc.connected_url if connected else None
        return {
            "stream": self.stream,
            "replicas": self.replicas,
            "connected": connected,
            "server": f"{url.scheme}://{url.netloc.rpartition('@')[2]}" if url else None,
        }

    def _kv_failed(self, what: str, exc: Exception) -> NatsUnavailable:
        if not self.nc.is_connected:
            return NatsUnavailable(f"{what}: not connected", NOT_CONNECTED)
        return NatsUnavailable(f"{what}: {exc!r}")

    def counters(self) -> dict[str, int]:
        return {
            "pending": len(self.pending) - self.changes_pending,
            "delivered": self.delivered,
            "acked": self.acked,
            "expired": self.expired,
            "withdrawn": self.withdrawn,
            "duplicates": self.duplicates,
            "changes_pending": self.changes_pending,
            "changes_delivered": self.changes_delivered,
            "changes_acked": self.changes_acked,
            "changes_expired": self.changes_expired,
            "nats_resyncs": self.resyncs,
            "nats_acks_stored": self.acks_stored,
            "nats_ack_failures": self.ack_failures,
        }


def _stream_seq(reply: str) -> int:
    """The stream sequence in a JetStream delivery's reply subject (`$JS.ACK.<stream>.<consumer>.
    <delivered>.<sseq>…`, or with domain and account hash after `$JS.ACK`), without building
    nats-py's Metadata (a dataclass and a datetime per message)."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def _headers(raw: bytes) -> dict[str, str]:
    """A stream message's headers (`NATS/1.0\r\nName: value\r\n…`), as nats-py reads them."""
    out = {}
    for line in raw.decode("utf-8", "replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


def _stream_pending(reply: str) -> int:
    """The messages the consumer still has to deliver after this one (reply subject)."""
    tokens = reply.split(".")
    return int(tokens[8] if len(tokens) == 9 else tokens[10])


def _stored(write: asyncio.Future[bool]) -> bool:
    """The write stored a new message (not refused, not a duplicate)."""
    return not write.cancelled() and write.exception() is None and write.result()


def _expires(headers: dict[str, str], ttl: float) -> float:
    try:
        return float(headers["Spop-Expires"])
    except (KeyError, ValueError):
        return time.time() + ttl
