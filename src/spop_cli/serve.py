"""`spop serve`: the hub's options merged (command line > environment > [hub] in the file), then run."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .diagnostics import open_diagnostics
from .hub.server import Hub, HubConfig, default_journal_path


class ServeError(Exception):
    """A hub option or [hub] key that cannot be used; the message names it."""


def build_hub_config(
    config_path: str | None = None, *, no_journal: bool = False, **options: Any
) -> HubConfig:
    """Command line > environment > `[hub]` of the file > defaults, through the one Settings."""
    from .config import ConfigError, load_settings

    given = {k: v for k, v in options.items() if v is not None}
    try:
        settings = load_settings(config_path, overrides={"hub": given})
    except ConfigError as exc:
        raise ServeError(str(exc)) from None
    merged = dict(settings.hub.options)
    if merged.get("http_port") == -1:
        merged["http_port"] = None
    if settings.diag_dir and not merged.get("diag_dir"):
        merged["diag_dir"] = str(settings.diag_dir)
    try:
        config = HubConfig(**merged)
    except TypeError as exc:
        raise ServeError(str(exc)) from None
    if no_journal:
        config.journal = None
    elif not config.journal:
        config.journal = str(default_journal_path())
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ServeError("--tls-cert and --tls-key go together")
    return config


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warnings(config: HubConfig) -> list[str]:
    """Listening beyond loopback without a token lets anyone on the network read pops."""
    warnings = []
    if not is_loopback(config.host):
        if not config.token and not config.source_token:
            warnings.append(
                f"listening on {config.host} without a token: anyone who reaches it can listen and publish"
            )
        elif not config.token:
            warnings.append(
                f"listening on {config.host} with only a source token: anyone who reaches it can listen"
            )
        if not config.tls_cert:
            warnings.append(f"listening on {config.host} without TLS: pops cross the network in clear")
    return warnings


def raise_open_file_limit(max_connections: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd's default soft limit, 1,024, lets a
    few hundred idle sockets lock out every listener and POST); a warning when still too low."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # macOS refuses RLIM_INFINITY; keep what we have
            pass
    if soft != resource.RLIM_INFINITY and soft < max_connections:
        return (
            f"the open-file limit ({soft}) is below max_connections ({max_connections}):"
            f" past about {soft} sockets the hub refuses every listener and POST;"
            " raise it (systemd: LimitNOFILE=, a shell: ulimit -n)"
        )
    return None


async def run_hub(config: HubConfig, ready_file: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM; write the ports to ready_file once listening."""
    log = open_diagnostics("hub", Path(config.diag_dir) if config.diag_dir else None)
    warning = raise_open_file_limit(config.max_connections)
    if warning:
        log.warning("%s", warning)
        print(f"spop: warning: {warning}", file=sys.stderr, flush=True)
    hub = Hub(config, log=log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows
            pass
    await hub.start()
    # What exists now lives as long as the hub: keep it out of every future collection, so
    # full collections walk only what pops and connections made (they were 25-160 ms pauses).
    gc.collect()
    gc.freeze()
    try:
        if ready_file:
            tmp = f"{ready_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump({"port": hub.port, "http_port": hub.http_port, "pid": os.getpid()}, handle)
            os.replace(tmp, ready_file)
        print(
            f"spop hub: listeners on {config.host} port {hub.port}, http port {hub.http_port},"
            f" journal {config.journal or 'off'}",
            flush=True,
        )
        await stop.wait()
    finally:
        await hub.stop()
