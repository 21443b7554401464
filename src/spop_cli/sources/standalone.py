"""`spop source NAME`: one source beside, not inside, a hub: events go over the listener port."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from typing import Any

from . import RemoteSink, Source
from .runner import SourceRunner

DEFAULT_LISTEN = "127.0.0.1:6081"


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` or `[v6]:PORT` for a webhook source's own HTTP port; port 0 picks a free one."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:6081), got {value!r}")
    return host, int(port)


async def run_standalone(
    name: str,
    source: Source,
    *,
    address: str,
    token: str | None,
    ssl_context: ssl.SSLContext | None,
    listen: str | None,
    log: logging.Logger,
    ready: Any = None,
) -> None:
    """Run until SIGINT/SIGTERM; webhook routes are served on `listen` (HOST:PORT, loopback default).

    `ready(port)` is called once listening (port None when the source has no routes)."""
    sink = RemoteSink(address, token=token, ssl_context=ssl_context, log=log)
    runner = SourceRunner({name: source}, sink, log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            pass
    http_runner = None
    port = None
    routes = runner.routes()
    if routes:
        from aiohttp import web

        host, wanted = parse_listen(listen or DEFAULT_LISTEN)
        app = web.Application()
        app.router.add_routes(routes)
        http_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await http_runner.setup()
        site = web.TCPSite(http_runner, host, wanted, reuse_address=True)
        await site.start()
        server = site._server  # the only way aiohttp tells the port picked for 0
        port = server.sockets[0].getsockname()[1] if server is not None else wanted  # type: ignore[union-attr]
        log.info("source %s: webhooks on %s port %s", name, host, port)
    await runner.start()
    try:
        if ready is not None:
            ready(port)
        await stop.wait()
    finally:
        await runner.stop()
        if http_runner is not None:
            await http_runner.cleanup()
        await sink.close()
