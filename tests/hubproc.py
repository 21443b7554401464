"""Real hubs for the reliability tests: `spop serve` subprocesses, in-process hubs, raw clients.

A `HubProcess` is a hub in its own process, so a test can SIGKILL it and start it again on the
same ports and journal. `inprocess_hub` is the same hub in the test's own event loop. `RawClient`
speaks bytes to the listener port, for input no well-behaved client would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import orjson

from spop_cli.hub.server import Hub, HubConfig
from spop_cli.listener.core import AsyncListener

LOOPBACK = "127.0.0.1"


def loops() -> list[Any]:
    """Plain asyncio, and uvloop (the CLI's loop) where installed: `pytest.mark.parametrize`
    a test's `runner` over them and run its body with `on(runner, body())`."""
    import pytest

    runners: list[Any] = [pytest.param(asyncio.run, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return runners
    return [*runners, pytest.param(uvloop.run, id="uvloop")]


def on(runner: Callable[..., Any], coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
    return runner(asyncio.wait_for(coro, timeout))


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    """Run one async test body on a fresh loop; the timeout only bounds a hung test."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01
) -> bool:
    """Poll (without blocking the loop) until predicate() is true or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


# -- a hub in this process -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def inprocess_hub(**options: Any) -> AsyncIterator[Hub]:
    """A started hub on free loopback ports in the running loop; stopped on exit."""
    config = {"host": LOOPBACK, "port": 0, "http_port": 0, "heartbeat": 1.0, **options}
    hub = Hub(HubConfig(**config))
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


def address_of(hub: Hub) -> str:
    return f"{hub.port}@{LOOPBACK}"


def http_of(hub: Hub, scheme: str = "http") -> str:
    return f"{scheme}://{LOOPBACK}:{hub.http_port}"


# -- a hub in its own process ----------------------------------------------------------------


class HubProcess:
    """`spop serve` as a subprocess: start, SIGKILL, SIGSTOP, restart on the same ports."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        journal: bool = True,
        heartbeat: float = 1.0,
        host: str = LOOPBACK,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.env = env or {}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.workdir / "ready.json"
        self.journal = self.workdir / "journal.sqlite3" if journal else None
        self.extra = [*args, "--heartbeat", str(heartbeat)]
        self.port = 0
        self.http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "spop_cli", "serve", "--host", self.host]
        cmd += ["--port", str(self.port), "--http-port", str(self.http_port)]
        cmd += ["--ready-file", str(self.ready_file)]
        cmd += ["--journal", str(self.journal)] if self.journal else ["--no-journal"]
        return cmd + self.extra

    def start(self, timeout: float = 20.0) -> HubProcess:
        """Start (the first time on free ports, then on the same ones) and wait until listening."""
        self.ready_file.unlink(missing_ok=True)
        env = {**os.environ, "SPOP_DIAG_DIR": str(self.workdir / "diag"), **self.env}
        self.starts += 1
        log = open(self.workdir / f"hub-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"spop serve exited {self.proc.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"spop serve not ready in {timeout} s: {self.output()}")
            time.sleep(0.005)  # it is ready ~0.35 s after its start: look often
        ready = json.loads(self.ready_file.read_text())
        self.port, self.http_port = ready["port"], ready["http_port"]
        return self

    def output(self) -> str:
        return (self.workdir / f"hub-{self.starts}.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no goodbye, no final commit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM: a graceful stop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> HubProcess:
        self.kill()
        return self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        """Resident memory of the hub process, bytes."""
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)

    @property
    def address(self) -> str:
        return f"{self.port}@{LOOPBACK}"

    @property
    def http(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def __enter__(self) -> HubProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


# -- raw bytes on the listener port ----------------------------------------------------------


class RawClient:
    """A bare TCP client: send any bytes, read the hub's frames, see it close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, ssl: Any = None) -> RawClient:
        reader, writer = await asyncio.open_connection(
            LOOPBACK, port, ssl=ssl, server_hostname=LOOPBACK if ssl else None, limit=1 << 24
        )
        return cls(reader, writer)

    async def send(self, data: bytes | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = orjson.dumps(data) + b"\n"
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self, timeout: float = 5.0, pings: bool = False) -> dict[str, Any] | None:
        """The next frame, or None once the hub has closed the connection.

        Pings are answered and skipped unless `pings` (then they are returned, unanswered).
        """
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return None
            frame = orjson.loads(line)
            if pings or frame.get("op") != "ping":
                return frame
            with contextlib.suppress(ConnectionError):
                await self.send(b'{"op":"pong"}\n')

    async def frames_until_closed(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        frames = []
        while (frame := await self.frame(timeout)) is not None:
            frames.append(frame)
        return frames

    async def hello(self, **fields: Any) -> dict[str, Any]:
        await self.send({"op": "hello", "version": 1, "ref": 0, **fields})
        welcome = await self.frame()
        assert welcome is not None
        return welcome

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a frame with a ref and return the answer to it (pops on the way are skipped)."""
        ref = f"r{time.monotonic_ns()}"
        await self.send({"op": op, "ref": ref, **fields})
        while True:
            frame = await self.frame()
            assert frame is not None, f"hub closed the connection instead of answering {op}"
            if frame.get("ref") == ref:
                return frame

    def close(self) -> None:
        self.writer.transport.abort()


# -- a listener that must keep receiving --------------------------------------------------------


class Canary:
    """A blocking listener on (telephone, canary): after each bad input, it must still get a pop."""

    def __init__(self, address: str, http_port: int, resource: str = "canary") -> None:
        from spop_cli import ScreenPopTelephoneListener

        self.http_port = http_port
        self.resource = resource
        self.got: list[str] = []
        self.listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
        self.listener.on_screen_pop(lambda event: self.got.append(event.source))
        self.listener.initialize(address)
        self.listener.start_listening(resource)

    def check(self, label: str, timeout: float = 5.0) -> None:
        """Publish a pop over HTTP and wait for it: the hub still accepts and delivers."""
        import urllib.request

        body = orjson.dumps({"media": "telephone", "resource": self.resource, "source": label})
        request = urllib.request.Request(
            f"http://{LOOPBACK}:{self.http_port}/v1/pops",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            assert response.status == 200
        deadline = time.monotonic() + timeout
        while label not in self.got:
            assert time.monotonic() < deadline, f"the canary did not get its pop after {label}"
            time.sleep(0.005)

    def close(self) -> None:
        self.listener.shutdown()


# -- pops and counting listeners ----------------------------------------------------------------


def pop(resource: str = "13579", media: str = "telephone", **fields: Any) -> dict[str, Any]:
    """A pop as a source sends it."""
    return {"media": media, "resource": resource, **fields}


class Counting:
    """An AsyncListener whose callbacks count every pop id (to see one run twice)."""

    def __init__(self, media: str = "telephone", **options: Any) -> None:
        self.listener = AsyncListener(
            media, reconnecting_interval=options.pop("reconnecting_interval", 0.3), **options
        )
        self.calls: Counter[str] = Counter()
        self.sources: list[str] = []
        self.listener.on_screen_pop(self._on_pop)

    def _on_pop(self, event: Any) -> None:
        self.calls[event.id] += 1
        self.sources.append(event.source)

    async def up(self, address: str, resource: str) -> Counting:
        await self.listener.initialize(address)
        await self.listener.start_listening(resource)
        return self

    def twice(self) -> list[str]:
        return [pop_id for pop_id, n in self.calls.items() if n > 1]


def http_post(url: str, body: Any) -> tuple[int, Any]:
    """POST JSON; the status and the decoded answer, errors included."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# -- listeners in another process ---------------------------------------------------------------

LISTENER_SCRIPT = r"""
import asyncio, collections, json, signal, sys
from spop_cli.listener.core import AsyncListener
from spop_cli.listener.shared import LinkPool
from spop_cli.model import ListenerStatus

async def main(address, prefix, count, interval, shared):
    calls = collections.Counter()
    seen = collections.defaultdict(set)
    losses = collections.Counter()
    listeners = []
    pool = LinkPool() if shared else None  # as `spop listen` does: one connection per hub

    async def start(i):
        listener = AsyncListener("telephone", reconnecting_interval=interval, timeout=60, pool=pool)
        listener.on_screen_pop(lambda event: (calls.update([event.id]), seen[event.resource].add(event.id)))
        listener.on_status_changed(lambda old, new: losses.update([new is ListenerStatus.Status_Reconnecting]))
        hubs = address.split(",")  # several hubs: listener i starts at hub i mod n (spread)
        shift = i % len(hubs)
        await listener.initialize(",".join(hubs[shift:] + hubs[:shift]))
        await listener.start_listening(f"{prefix}{i}" if count > 1 else prefix)
        listeners.append(listener)

    await asyncio.gather(*(start(i) for i in range(count)))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while True:
        up = sum(listener.status is ListenerStatus.Status_Up for listener in listeners)
        twice = sum(1 for n in calls.values() if n > 1)
        by_resource = {resource: len(ids) for resource, ids in seen.items()}
        report = {"up": up, "pops": len(calls), "calls": sum(calls.values()), "twice": twice}
        print(json.dumps({**report, "by_resource": by_resource, "losses": losses[True]}), flush=True)
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:] == ["shared"]))
"""


class ListenerProcess:
    """`count` AsyncListeners (telephone, `prefix`N) in one subprocess, reporting every 0.2 s:
    how many are Up, how many pop ids reached their callbacks (in all, per resource), how many
    did so twice, and how many times a listener went Reconnecting. `shared`: all on connections
    of one `LinkPool`, as `spop listen` holds them (else one connection each, as desktops)."""

    def __init__(
        self,
        workdir: Path,
        address: str,
        prefix: str,
        count: int = 1,
        interval: float = 1.0,
        shared: bool = False,
    ) -> None:
        import threading

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        script = self.workdir / "listeners.py"
        script.write_text(LISTENER_SCRIPT)
        env = {**os.environ, "SPOP_DIAG_DIR": str(self.workdir / "diag")}
        self.proc = subprocess.Popen(
            [sys.executable, str(script), address, prefix, str(count), str(interval)]
            + (["shared"] if shared else []),
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / "listeners.err", "wb"),  # noqa: SIM115
            env=env,
        )
        self.state: dict[str, Any] = {
            "up": 0,
            "pops": 0,
            "calls": 0,
            "twice": 0,
            "by_resource": {},
            "losses": 0,
        }
        self.reports = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.state = json.loads(line)
            self.reports += 1

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.state):
                return True
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "listeners.err").read_text())
            time.sleep(0.05)
        return predicate(self.state)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)


def module_hub_fixtures(**options: Any) -> tuple[Any, Any]:
    """A module's `hub` (a HubThread with `options`) and `canary` (a listener that must still be
    served after every bad input) fixtures, each writing diagnostics in its own tmp dir."""
    import pytest

    from conftest import HubThread

    @pytest.fixture(scope="module")
    def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubThread]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SPOP_DIAG_DIR", str(tmp_path_factory.mktemp("diag")))
            running = HubThread(**options)
            yield running
            running.close()

    @pytest.fixture(scope="module")
    def canary(hub: HubThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Canary]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SPOP_DIAG_DIR", str(tmp_path_factory.mktemp("diag")))
            bird = Canary(hub.address, hub.options["http_port"])
            yield bird
            bird.close()

    return hub, canary


# -- a hub that says exactly what the test scripts ---------------------------------------------


def wire_pop(pop_id: str, resource: str = "13579", **fields: Any) -> dict[str, Any]:
    """A pop as the hub sends it: every field present."""
    return {
        "id": pop_id,
        "media": "telephone",
        "resource": resource,
        "contact_id": "",
        "created_at": "2026-01-01T00:00:00.000Z",
        "source": "",
        "destination": "",
        "queue_name": "",
        "contact_description": "",
        "from": "",
        "redirect": "",
        "wait_time": 0,
        "contact_data": {},
        **fields,
    }


class ScriptedHub:
    """A listener-port peer on loopback that answers the handshake and every request (`ok`), then
    sends the pops a test scripts — say, a replay a real hub makes after acks were lost — and
    records every line the listener sends, so a test sees each frame and its size."""

    def __init__(self, max_frame: int = 65_536, pop_ttl: float = 120.0) -> None:
        self.max_frame = max_frame
        self.pop_ttl = pop_ttl
        self.lines: list[bytes] = []  # every line received, in order
        self.registered = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> ScriptedHub:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0, limit=1 << 24)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"{self.port}@{LOOPBACK}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                self.lines.append(line.rstrip(b"\n"))
                frame = orjson.loads(line)
                op, ref = frame.get("op"), frame.get("ref")
                if op == "hello":
                    welcome = {"op": "welcome", "version": 1, "server": "scripted", "ref": ref}
                    welcome.update(heartbeat=30, max_frame=self.max_frame, pop_ttl=self.pop_ttl)
                    writer.write(orjson.dumps(welcome) + b"\n")
                elif op == "ping":
                    writer.write(b'{"op":"pong"}\n')
                elif ref is not None:
                    writer.write(orjson.dumps({"op": "ok", "ref": ref}) + b"\n")
                    if op == "register":
                        self.writer = writer
                        self.registered.set()
                await writer.drain()

    async def send_pops(self, pops: list[dict[str, Any]]) -> None:
        """All at once, as a hub replaying a backlog without flow control would."""
        assert self.writer is not None
        self.writer.write(b"".join(orjson.dumps({"op": "pop", "pop": p}) + b"\n" for p in pops))
        await self.writer.drain()

    def acked(self) -> list[str]:
        """Every id acked so far, in order, repeats included."""
        ids: list[str] = []
        for line in self.lines:
            frame = orjson.loads(line)
            if frame.get("op") == "ack":
                ids += frame.get("ids", [frame.get("id")] if "id" in frame else [])
        return ids

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.writer is not None:
            self.writer.transport.abort()
