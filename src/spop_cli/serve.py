"""`spop serve`: the hub's options merged (command line > environment > [hub] in the file), then run."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
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
    if no_journal or config.backend == "nats":  # on NATS, JetStream is the journal
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
            warnings.append(
                f"listening on {config.host} without TLS: pops cross the network in clear"
            )
    return warnings


def build_sources(config_path: str | None, plugin_dirs: list[str] | None = None) -> dict[str, Any]:
    """The `[sources.NAME]` tables of the hub's file (not `enabled = false`), built; ServeError
    names the key at fault."""
    from .config import ConfigError, load_settings
    from .plugins import PluginError, get_plugin_manager, source_types
    from .sources import SourceError, configured_sources, make_source

    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        raise ServeError(str(exc)) from None
    tables = {
        name: table
        for name, table in configured_sources(settings.document).items()
        if table.get("enabled", True)
    }
    if not tables:
        return {}
    try:
        types = source_types(
            get_plugin_manager([*map(str, settings.plugin_dirs), *(plugin_dirs or [])])
        )
    except PluginError as exc:
        raise ServeError(f"plugins: {exc}") from None
    built = {}
    for name, table in tables.items():
        try:
            built[name] = make_source(types, name, table)
        except SourceError as exc:
            key = f"sources.{name}.{exc.key}" if exc.key else f"sources.{name}"
            raise ServeError(f"{key}: {exc.message}") from None
    return built


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


SUMMARY_EVERY = 60.0  # seconds between the hub log's "pops in the last minute" lines


def pop_words(pop: dict[str, Any]) -> str:
    """A pop in one log line: id, key, and the fields that are set."""
    fields = " ".join(
        f"{name}={pop[name]!r}"
        for name in ("source", "destination", "queue_name", "from", "redirect")
        if pop.get(name)
    )
    return f"pop {pop['id']} for {pop['media']} {pop['resource']} accepted" + (
        f": {fields}" if fields else ""
    )


async def log_summaries(hub: Hub, log: logging.Logger, every: float = SUMMARY_EVERY) -> None:
    """Every `every` seconds in which pops moved, one line of counts in the hub's log: the log
    records pops at no cost per pop (a line per pop is `--verbose`)."""
    keys = ("pops_accepted", "delivered", "acked", "expired", "duplicates")
    last = dict.fromkeys(keys, 0)
    while True:
        await asyncio.sleep(every)
        counters = hub.status()["counters"]
        now = {key: int(counters.get(key, 0)) for key in keys}
        if now != last:
            moved = {key: now[key] - last[key] for key in keys}
            log.info(
                "pops in the last %g s: %d accepted, %d delivered, %d acknowledged, %d expired,"
                " %d duplicates; %d pending",
                every,
                *moved.values(),
                hub.status()["pending"],
            )
            last = now


def echo_log(log: logging.Logger) -> logging.Handler:
    """`--verbose`: the hub's log lines on standard output too, one per line, timed."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    return handler


async def run_hub(
    config: HubConfig,
    ready_file: str | None = None,
    verbose: bool = False,
    sources: dict[str, Any] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM; write the ports to ready_file once listening.

    `verbose`: a line per pop and per registration on standard output (and in the hub's log).
    """
    log = open_diagnostics("hub", Path(config.diag_dir) if config.diag_dir else None)
    warning = raise_open_file_limit(config.max_connections)
    if warning:
        log.warning("%s", warning)
        print(f"spop: warning: {warning}", file=sys.stderr, flush=True)
    hub = Hub(config, log=log)
    echo = echo_log(log) if verbose else None
    if verbose:
        hub.on_pop = lambda pop: log.info("%s", pop_words(pop))
    if sources:
        from .sources import HubSink
        from .sources.runner import SourceRunner

        hub.sources = SourceRunner(sources, HubSink(hub), log.getChild("source"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows
            pass
    await hub.start()
    for warning in hub.journal.warnings if hub.journal is not None else ():
        print(f"spop: warning: {warning}", file=sys.stderr, flush=True)  # also in the diagnostics
    # What exists now lives as long as the hub: keep it out of every future collection, so
    # full collections walk only what pops and connections made (they were 25-160 ms pauses).
    gc.collect()
    gc.freeze()
    try:
        if ready_file:
            tmp = f"{ready_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(
                    {"port": hub.port, "http_port": hub.http_port, "pid": os.getpid()}, handle
                )
            os.replace(tmp, ready_file)
        http = f"HTTP on port {hub.http_port}" if hub.http_port else "no HTTP port (--http-port -1)"
        journal = f"journal {config.journal}" if config.journal else "no journal (pops in memory)"
        if config.backend == "nats":
            journal = f"pops on NATS JetStream (stream {config.nats_stream}, {config.nats_replicas} replicas)"
        print(
            f"spop hub: listeners on {config.host} port {hub.port}, {http}, {journal}."
            + ("" if verbose else " --verbose shows each pop."),
            flush=True,
        )
        summaries = asyncio.get_running_loop().create_task(log_summaries(hub, log))
        try:
            await stop.wait()
        finally:
            summaries.cancel()
    finally:
        await hub.stop()
        if echo is not None:
            log.removeHandler(echo)
