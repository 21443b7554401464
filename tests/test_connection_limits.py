"""Connections that never end: idle and too-slow HTTP clients are closed, descriptors are freed,
and the hub raises its open-file limit at start (issue 10, section 4). Real sockets throughout."""

from __future__ import annotations

import asyncio
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from hubproc import LOOPBACK, Counting, HubProcess, inprocess_hub, pop, run, until
from spop_cli.model import ScreenPopError

IDLE = 0.5  # seconds: short, so both sides of the limit are cheap to pin
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # the CLI runs uvloop


def run_on(loop: str, coro: Any) -> None:
    """One test body on plain asyncio or on uvloop."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(asyncio.wait_for(coro, 60))
    else:
        run(coro)


async def closed_after(reader: asyncio.StreamReader, timeout: float = 15.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took from now. A reset
    counts as closed with nothing more: the hub closing a socket that still holds unread bytes
    (a dribbling client's last one) makes the kernel send RST instead of FIN."""
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        data = b""
    return data, time.monotonic() - started


@LOOPS
def test_an_idle_keep_alive_connection_is_closed_after_the_timeout_not_before(loop: str) -> None:
    async def body() -> None:
        async with inprocess_hub(http_idle_timeout=IDLE) as hub:
            reader, writer = await asyncio.open_connection(LOOPBACK, hub.http_port)
            writer.write(b"GET /v1/health HTTP/1.1\r\nHost: hub\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            # the answer is in: from now the connection is idle
            rest, waited = await closed_after(reader)
            assert rest == b""
            assert waited >= IDLE - 0.05  # not before the timeout
            assert waited < IDLE + 10  # but it does end
            writer.close()

    run_on(loop, body())


@LOOPS
def test_a_connection_that_never_sends_a_request_is_closed_after_the_timeout(loop: str) -> None:
    async def body() -> None:
        async with inprocess_hub(http_idle_timeout=IDLE) as hub:
            reader, writer = await asyncio.open_connection(LOOPBACK, hub.http_port)
            rest, waited = await closed_after(reader)
            assert rest == b""
            assert IDLE - 0.05 <= waited < IDLE + 10
            writer.close()

    run_on(loop, body())


@LOOPS
def test_a_slowloris_dribbling_its_headers_is_closed(loop: str) -> None:
    async def body() -> None:
        async with inprocess_hub(http_idle_timeout=IDLE) as hub:
            reader, writer = await asyncio.open_connection(LOOPBACK, hub.http_port)
            head = b"GET /v1/health HTTP/1.1\r\nHost: hub\r\nX-Slow: " + b"a" * 200

            async def dribble() -> None:
                for byte in head:  # 200+ bytes at 10 a second: 20 s if left alone
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.1)

            task = asyncio.create_task(dribble())
            rest, waited = await closed_after(reader)
            assert rest == b""  # closed without an answer, the head never completed
            assert IDLE - 0.05 <= waited < IDLE + 10
            assert not task.done() or task.exception() is not None
            task.cancel()
            writer.close()

    run_on(loop, body())


@LOOPS
def test_a_body_dribbled_too_slowly_gets_408_and_the_connection_closes(loop: str) -> None:
    async def body() -> None:
        async with inprocess_hub(http_idle_timeout=30, http_body_timeout=IDLE) as hub:
            reader, writer = await asyncio.open_connection(LOOPBACK, hub.http_port)
            payload = orjson.dumps(pop(source="slow"))
            writer.write(
                b"POST /v1/pops HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(payload) + payload[:5]
            )
            await writer.drain()
            answer, waited = await closed_after(reader)
            head, _, json_body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 ")
            assert orjson.loads(json_body) == {
                "error": "timeout",
                "message": f"body not received within {IDLE:g} s",
            }
            assert IDLE - 0.05 <= waited < IDLE + 10
            assert hub.status()["pending"] == 0
            writer.close()

    run_on(loop, body())


def test_a_body_inside_the_timeout_is_accepted() -> None:
    async def body() -> None:
        async with inprocess_hub(http_idle_timeout=30, http_body_timeout=3.0) as hub:
            reader, writer = await asyncio.open_connection(LOOPBACK, hub.http_port)
            payload = orjson.dumps(pop(source="slow but in time"))
            writer.write(
                b"POST /v1/pops HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(payload) + payload[:5]
            )
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.write(payload[5:])
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert hub.status()["pending"] == 1
            writer.close()

    run(body())


class LimitedHub(HubProcess):
    """`spop serve` started under `prlimit --nofile=SOFT:HARD`, to run out of descriptors cheaply."""

    def __init__(self, workdir: Path, soft: int, hard: int, *args: str) -> None:
        super().__init__(workdir, *args)
        self.nofile = (soft, hard)

    def command(self) -> list[str]:
        soft, hard = self.nofile
        return ["prlimit", f"--nofile={soft}:{hard}", "--", *super().command()]


needs_prlimit = pytest.mark.skipif(
    shutil.which("prlimit") is None or sys.platform != "linux", reason="needs prlimit (util-linux)"
)


def config_file(workdir: Path, **hub: object) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "spop.toml"
    path.write_text("[hub]\n" + "".join(f"{key} = {value}\n" for key, value in hub.items()))
    return str(path)


@needs_prlimit
def test_hundreds_of_idle_sockets_do_not_lock_out_a_post_or_a_listener(tmp_path: Path) -> None:
    # 128 descriptors, 300 idle HTTP sockets and 60 silent ones on the listener port: without
    # the timeouts the hub would accept nothing more until they went away by themselves
    config = config_file(tmp_path, http_idle_timeout=1, handshake_timeout=1)
    hub = LimitedHub(tmp_path, 128, 128, "--config", config).start()
    try:

        async def body() -> None:
            async def connect(port: int) -> asyncio.StreamWriter | None:
                try:
                    return (await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 5))[1]
                except (OSError, TimeoutError):
                    return None

            idle = await asyncio.gather(
                *(connect(hub.http_port) for _ in range(300)),
                *(connect(hub.port) for _ in range(60)),
            )
            assert sum(w is not None for w in idle) >= 128  # past the limit: descriptors ran out
            listener = await listener_up(hub.address)
            status = await asyncio.to_thread(post, hub.http + "/v1/pops", pop(source="through"))
            assert status == 200
            assert await until(lambda: listener.sources == ["through"], 15)
            await listener.listener.shutdown()
            for writer in idle:
                if writer is not None:
                    writer.transport.abort()

        run(body())
    finally:
        hub.stop()


async def listener_up(address: str) -> Counting:
    """A listener registered, retrying while the hub still sheds connections (libuv accepts and
    closes them when out of descriptors): within the idle timeout, it must get through."""
    deadline = time.monotonic() + 30
    while True:
        listener = Counting()
        try:
            return await listener.up(address, "13579")
        except ScreenPopError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def post(url: str, body: object) -> int:
    """POST with retries while the hub is still out of descriptors (refused or reset)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 30
    while True:
        request = urllib.request.Request(
            url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@needs_prlimit
@pytest.mark.parametrize("max_connections, warned", [(512, False), (513, True)])
def test_the_hub_raises_its_open_file_limit_and_warns_below_max_connections(
    tmp_path: Path, max_connections: int, warned: bool
) -> None:
    config = config_file(tmp_path, max_connections=max_connections)
    hub = LimitedHub(tmp_path, 256, 512, "--config", config).start()
    try:
        assert resource.prlimit(hub.pid, resource.RLIMIT_NOFILE) == (512, 512)
        hub.stop()
        warning = (
            f"spop: warning: the open-file limit (512) is below max_connections ({max_connections}):"
            " past about 512 sockets the hub refuses every listener and POST;"
            " raise it (systemd: LimitNOFILE=, a shell: ulimit -n)"
        )
        assert (warning in hub.output()) == warned
    finally:
        hub.stop()


def test_the_systemd_unit_sets_limitnofile() -> None:
    operations = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    unit = operations.split("[Service]", 1)[1].split("```", 1)[0]
    assert "\nLimitNOFILE=1048576\n" in unit


FULL = (
    b'{"op":"error","code":"SCREENPOP_Memory_Allocation_Error",'
    b'"message":"hub at its connection limit","fatal":true}\n'
)


@LOOPS
def test_a_client_refused_at_the_connection_limit_always_reads_why(loop: str) -> None:
    """The hub refuses at once, while the client's hello is on its way: a full close then made
    the client's kernel get a reset and drop the error frame, and `spop status` / `send` said
    "not connected" (exit 3) instead of the limit (exit 10) 3 to 8 times in 10."""
    from spop_cli import client

    async def body() -> None:
        async with inprocess_hub(max_connections=1) as hub:
            first = await client.connect(f"{hub.port}@{LOOPBACK}")
            for _ in range(20):  # raw: hello sent without waiting, as any client does
                reader, writer = await asyncio.open_connection(LOOPBACK, hub.port)
                writer.write(b'{"op": "hello", "version": 1, "role": "listener", "ref": 1}\n')
                data, _ = await closed_after(reader)
                assert data == FULL
                writer.close()
            for _ in range(20):  # the Python client, as the CLI runs it
                with pytest.raises(ScreenPopError) as refused:
                    await client.connect(f"{hub.port}@{LOOPBACK}")
                assert refused.value.code.value == "SCREENPOP_Memory_Allocation_Error"
                assert refused.value.message == "hub at its connection limit"
            assert hub.counters["refused_connections"] == 40
            first.close()

    run_on(loop, body())


def test_spop_status_at_the_connection_limit_exits_10(tmp_path: Path) -> None:
    config = config_file(tmp_path, max_connections=1)
    hub = HubProcess(tmp_path / "hub", "--config", config).start()
    try:

        async def body() -> None:
            from spop_cli import client

            first = await client.connect(hub.address)
            for _ in range(5):
                done = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "spop_cli", "status", "--server", hub.address,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                _, err = await done.communicate()
                assert done.returncode == 10, err
                assert err.decode().splitlines()[0] == (
                    "spop: error: SCREENPOP_Memory_Allocation_Error: hub at its connection limit"
                )
            first.close()

        run(body())
    finally:
        hub.stop()
