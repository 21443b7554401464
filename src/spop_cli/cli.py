"""The `spop` command: click parses, the library works, this module formats. Imports stay lazy."""

from __future__ import annotations

import click

from . import __version__

# Exit statuses, one per failure kind (docs/cli.md).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CODES = {
    "SCREENPOP_Cannot_Find_HiPath_ProCenter": 3,
    "SCREENPOP_Cannot_Register": 4,
    "SCREENPOP_Initialization_Error": 5,
    "SCREENPOP_Cannot_Create_Diags": 6,
    "SCREENPOP_Wrong_Status": 7,
    "SCREENPOP_Already_Registered": 8,
    "SCREENPOP_Framework_Error": 9,
    "SCREENPOP_Memory_Allocation_Error": 10,
    "SCREENPOP_Wrong_Key": 11,
}
EXIT_CONFIG = 12  # configuration file invalid
EXIT_REJECTED = 13  # the hub rejected input (HTTP 4xx / error frame on publish)
EXIT_ACTION_FAILED = 14  # an action failed (spop listen --once / --count)
EXIT_TIMEOUT = 15  # --timeout passed before the pops asked for arrived


def fail(error: Exception) -> None:
    """Print an error naming its SCREENPOP code and exit with that code's status."""
    from .model import ScreenPopError

    if isinstance(error, ScreenPopError):
        click.echo(f"spop: error: {error}", err=True)
        raise SystemExit(EXIT_CODES.get(error.code.value, 1))
    click.echo(f"spop: error: {error}", err=True)
    raise SystemExit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spop")
def cli() -> None:
    """spop: screen pops for contact centers (hub, listeners, actions)."""


def main() -> None:
    cli(prog_name="spop")


# --- hub, sources, demo (lead) -------------------------------------------------------------

SERVER_HELP = "Hub address: PORT@HOST (the guide's form), HOST:PORT or [v6]:PORT."


def _server_option(fn):  # type: ignore[no-untyped-def]
    return click.option(
        "--server",
        envvar="SPOP_SERVER",
        default="6000@localhost",
        show_default=True,
        help=SERVER_HELP,
    )(fn)


def _token_option(fn):  # type: ignore[no-untyped-def]
    return click.option("--token", envvar="SPOP_TOKEN", default=None, help="Token the hub requires.")(fn)


def _run(coro):  # type: ignore[no-untyped-def]
    """Run a coroutine on uvloop where installed, else asyncio."""
    import asyncio

    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@cli.command()
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1: loopback only).")
@click.option("--port", type=int, default=None, help="Listener port (default 6000; 0 picks a free one).")
@click.option("--http-port", type=int, default=None, help="HTTP port (default 6080; 0 picks a free one; -1 disables).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, envvar="SPOP_CONFIG", help="Configuration file ([hub] section).")
@click.option("--token", envvar="SPOP_TOKEN", default=None, help="Token listeners (and sources) must present.")
@click.option("--source-token", envvar="SPOP_SOURCE_TOKEN", default=None, help="Separate token for publishing; desktops with --token then cannot publish.")
@click.option("--journal", type=click.Path(dir_okay=False), default=None, help="SQLite journal of accepted pops (default: the user state dir).")
@click.option("--no-journal", is_flag=True, help="Keep pops in memory only.")
@click.option("--pop-ttl", type=float, default=None, help="Seconds an undelivered pop is kept (default 120).")
@click.option("--dedupe-window", type=float, default=None, help="Seconds a pop id stays a duplicate (default 120).")
@click.option("--heartbeat", type=float, default=None, help="Seconds between heartbeats (default 10).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM certificate: TLS on both ports.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM private key for --tls-cert.")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None, help="Write the bound ports as JSON here once listening.")
def serve(config_path: str | None, ready_file: str | None, no_journal: bool, **options: object) -> None:
    """Run the hub: the listener port, the HTTP port, the journal."""
    from .serve import ServeError, build_hub_config, run_hub

    try:
        config = build_hub_config(config_path, no_journal=no_journal, **options)
    except ServeError as exc:
        click.echo(f"spop: error: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    for warning in config_warnings(config):
        click.echo(f"spop: warning: {warning}", err=True)
    import sqlite3
    import ssl
    from pathlib import Path

    from .model import ScreenPopError

    def journal_fails(reason: object) -> None:
        click.echo(
            f"spop: error: hub.journal: cannot open the journal {config.journal}: {reason}",
            err=True,
        )
        raise SystemExit(EXIT_CONFIG) from None

    try:
        _run(run_hub(config, ready_file=ready_file))
    except sqlite3.Error as exc:
        journal_fails(exc)
    except ssl.SSLError as exc:  # an OSError too: before it, or a bad PEM reads "cannot listen"
        click.echo(
            f"spop: error: hub.tls_cert/hub.tls_key: cannot load the certificate {config.tls_cert}"
            f" and key {config.tls_key}: {exc}",
            err=True,
        )
        raise SystemExit(EXIT_CONFIG) from None
    except ScreenPopError as exc:  # the diagnostics folder cannot be made
        fail(exc)
    except OSError as exc:
        if exc.filename and config.journal and Path(config.journal).is_relative_to(exc.filename):
            journal_fails(exc)  # its folder cannot be made
        click.echo(f"spop: error: cannot listen: {exc}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass


def config_warnings(config) -> list[str]:  # type: ignore[no-untyped-def]
    from .serve import exposure_warnings

    return exposure_warnings(config)


def _pop_fields(media: str, resource: str, fields: dict, data: tuple[str, ...]) -> dict:  # type: ignore[type-arg]
    pop = {"media": media, "resource": resource}
    for name, value in fields.items():
        if value is not None:
            pop[name] = value
    contact_data: dict[str, str] = {}
    for item in data:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--data")
        contact_data[key] = value
    if contact_data:
        pop["contact_data"] = contact_data
    return pop


@cli.command()
@click.argument("media", type=click.Choice(["telephone", "callback", "email", "webcollab"]))
@click.argument("resource")
@_server_option
@_token_option
@click.option("--source", default=None, help="Caller's number, customer's address, account or IP.")
@click.option("--destination", default=None, help="Number dialled, address written to, or destination.")
@click.option("--queue", "queue_name", default=None, help="Queue name.")
@click.option("--description", "contact_description", default=None, help="Contact description.")
@click.option("--from", "from_", default=None, help="Extension that transferred or consulted.")
@click.option("--redirect", default=None, help="Number the call was forwarded or deflected from.")
@click.option("--wait", "wait_time", type=click.IntRange(min=0), default=None, help="Wait time in seconds.")
@click.option("--data", multiple=True, metavar="KEY=VALUE", help="Contact data (repeatable; the value may contain '=').")
@click.option("--contact-id", default=None, help="Contact the pop belongs to.")
@click.option("--id", "pop_id", default=None, help="Pop id, so a resend is recognised as the same pop.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the hub.")
@click.option("--cafile", type=click.Path(exists=True, dir_okay=False), default=None, help="CA to verify a TLS hub.")
def send(media: str, resource: str, server: str, token: str | None, data: tuple[str, ...], pop_id: str | None, contact_id: str | None, timeout: float, cafile: str | None, from_: str | None, **fields: object) -> None:
    """Send one pop to the listeners of MEDIA RESOURCE; exit 0 once the hub has accepted it."""
    from . import client

    fields["from"] = from_
    fields["id"] = pop_id
    fields["contact_id"] = contact_id
    pop = _pop_fields(media, resource, fields, data)
    try:
        ids = _run(client.publish(server, pop, token=token, timeout=timeout, ssl_context=_client_ssl(cafile)))
    except Exception as exc:  # noqa: BLE001 - every failure is reported with its code
        _fail_send(exc)
    click.echo(ids[0])


def _client_ssl(cafile: str | None):  # type: ignore[no-untyped-def]
    if not cafile:
        return None
    import ssl

    return ssl.create_default_context(cafile=cafile)


def _fail_send(exc: Exception) -> None:
    from .client import Rejected

    if isinstance(exc, Rejected):
        detail = exc.detail
        where = "".join(
            f" {name} {detail[name]}" for name in ("index", "field") if detail.get(name) is not None
        )
        applied = f"; {detail['applied']} earlier events applied" if detail.get("applied") else ""
        click.echo(
            f"spop: error: rejected by the hub ({detail.get('error', '?')}{where}): {exc}{applied}",
            err=True,
        )
        raise SystemExit(EXIT_REJECTED)
    fail(exc)


@cli.command()
@click.argument("scenario")
@_server_option
@_token_option
@click.option("--realtime", is_flag=True, help="Wait the scenario's delays for real.")
@click.option("--contact-prefix", default=None, help="Prefix contact ids (default: a fresh one per run).")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@click.option("--cafile", type=click.Path(exists=True, dir_okay=False), default=None, help="CA to verify a TLS hub.")
@click.option("--json", "as_json", is_flag=True, help="Print the hub's answer as JSON.")
def simulate(scenario: str, server: str, token: str | None, realtime: bool, contact_prefix: str | None, timeout: float, cafile: str | None, as_json: bool) -> None:
    """Play a scenario file (or routed-call, consultation, requeue, …) as contact events."""
    from .scenario import load_scenario
    from .simulate import play

    try:
        loaded = load_scenario(scenario)
    except (OSError, ValueError) as exc:
        click.echo(f"spop: error: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    try:
        result = _run(play(loaded, server, token=token, realtime=realtime, prefix=contact_prefix, timeout=timeout, ssl_context=_client_ssl(cafile)))
    except Exception as exc:  # noqa: BLE001
        _fail_send(exc)
    if as_json:
        import json

        click.echo(json.dumps(result))
    else:
        click.echo(f"{loaded.name}: {result['applied']} events applied, {len(result['pops'])} pops")


@cli.command()
@click.option("--delay", type=float, default=0.4, show_default=True, help="Seconds between the demo's steps.")
def demo(delay: float) -> None:
    """A whole contact center in one process: hub, listeners, the guide's scenarios, then exit."""
    from .demo import run_demo

    raise SystemExit(_run(run_demo(delay=delay)))


# --- listen, config, plugins, diag, status (helper B) --------------------------------------

CONFIG_HELP = (
    "Configuration file (default: $SPOP_CONFIG, else spop/config.toml in the user config dir)."
)
MEDIA_WORDS = ["telephone", "callback", "email", "webcollab"]


def _config_option(fn):  # type: ignore[no-untyped-def]
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=CONFIG_HELP
    )(fn)


def _plugins_dir_option(fn):  # type: ignore[no-untyped-def]
    return click.option(
        "--plugins-dir",
        "plugin_dirs",
        multiple=True,
        type=click.Path(exists=True, file_okay=False),
        help="Folder of plugin modules to load (repeatable; adds to [plugins] dirs).",
    )(fn)


def _config_fail(problems) -> None:  # type: ignore[no-untyped-def]
    """Report every configuration problem, then exit EXIT_CONFIG."""
    for problem in problems:
        click.echo(f"spop: error: config: {problem}", err=True)
    raise SystemExit(EXIT_CONFIG)


def _load_settings(config_path: str | None, overrides: dict | None = None):  # type: ignore[no-untyped-def,type-arg]
    from .config import ConfigError, load_settings

    try:
        return load_settings(config_path, overrides)
    except ConfigError as exc:
        _config_fail(exc.problems)


def _load_document(config_path: str | None):  # type: ignore[no-untyped-def]
    """The merged settings without validation (show, plugins, diag must work on a broken file)."""
    from .config import ConfigError, load_document

    try:
        return load_document(config_path)
    except ConfigError as exc:
        _config_fail(exc.problems)


def _plugin_dirs_of(doc: dict, extra: tuple[str, ...] = ()) -> list[str]:  # type: ignore[type-arg]
    """`[plugins] dirs` of a merged document (if well formed), then the --plugins-dir ones."""
    dirs = (doc.get("plugins") or {}).get("dirs") if isinstance(doc.get("plugins"), dict) else None
    listed = [d for d in dirs if isinstance(d, str)] if isinstance(dirs, list) else []
    return [*listed, *extra]


def _plugin_manager(dirs):  # type: ignore[no-untyped-def]
    """The plugin manager and its action types, or exit EXIT_CONFIG naming the plugin at fault."""
    from .plugins import PluginError, action_types, get_plugin_manager

    try:
        pm = get_plugin_manager(dirs)
        return pm, action_types(pm)
    except PluginError as exc:
        click.echo(f"spop: error: plugins: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None


# -- spop config ------------------------------------------------------------------------------
@cli.group("config")
def config_group() -> None:
    """Write, show and check the configuration file."""


@config_group.command("init")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing file.")
def config_init(path: str | None, force: bool) -> None:
    """Write a valid starting configuration to PATH (default: the user config file)."""
    from .config import config_path_from, init_config

    target = path or config_path_from(None)[0]
    try:
        written = init_config(target, force=force)
    except OSError as exc:
        if exc.strerror is None:  # init_config's own refusal: the file exists
            click.echo(f"spop: error: {exc}", err=True)
        else:  # a folder that cannot be made, no permission, a read-only disk
            where = (
                f" ({exc.filename})" if exc.filename and str(exc.filename) != str(target) else ""
            )
            click.echo(f"spop: error: cannot write {target}: {exc.strerror}{where}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    click.echo(str(written))


@config_group.command("show")
@_config_option
@click.option("--secrets", is_flag=True, help="Show tokens instead of ********.")
def config_show(config_path: str | None, secrets: bool) -> None:
    """Print the merged settings (file, environment, defaults) as TOML."""
    from .config import show_config

    doc, path, sources = _load_document(config_path)
    from_env = sorted({origin for origin in sources.values() if origin.startswith("SPOP_")})
    click.echo(f"# file: {path or 'none (defaults)'}")
    if from_env:
        click.echo(f"# environment: {', '.join(from_env)}")
    click.echo(show_config(doc, secrets=secrets), nl=False)


@config_group.command("check")
@_config_option
@_plugins_dir_option
def config_check(config_path: str | None, plugin_dirs: tuple[str, ...]) -> None:
    """Validate the configuration; list every problem with its key and value (exit 12).

    Warnings (risky but valid settings) are listed too, and leave the exit status alone.
    """
    from .config import Problem, review_config
    from .plugins import PluginError, action_types, get_plugin_manager

    doc, path, sources = _load_document(config_path)
    problems = []
    types = None
    try:
        types = action_types(get_plugin_manager(_existing(_plugin_dirs_of(doc, plugin_dirs))))
    except PluginError as exc:
        problems.append(Problem("plugins", str(exc)))
    found, warnings = review_config(doc, types if types is not None else {}, sources)
    problems[:0] = found
    if types is None:  # without plugins, "unknown action plugin" would only repeat the plugin error
        problems = [p for p in problems if not p.message.startswith("unknown action")]
    where = str(path) if path else "defaults"
    for warning in warnings:
        click.echo(f"warning: {warning}")
    if problems:
        for problem in problems:
            click.echo(str(problem))
        click.echo(f"spop: error: {len(problems)} problem(s) in {where}", err=True)
        raise SystemExit(EXIT_CONFIG)
    listeners, actions = len(doc.get("listeners", [])), len(doc.get("actions", {}))
    warned = f", {len(warnings)} warning(s)" if warnings else ""
    click.echo(f"{where}: ok ({listeners} listener(s), {actions} action(s){warned})")


def _existing(dirs: list[str]) -> list[str]:
    from pathlib import Path

    return [d for d in dirs if Path(d).expanduser().is_dir()]


# -- spop plugins -----------------------------------------------------------------------------
@cli.command("plugins")
@_config_option
@_plugins_dir_option
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
def plugins_command(config_path: str | None, plugin_dirs: tuple[str, ...], as_json: bool) -> None:
    """List every plugin and action type, and where each came from."""
    from .plugins import list_plugins

    doc, _, _ = _load_document(config_path)
    pm, types = _plugin_manager(_plugin_dirs_of(doc, plugin_dirs))
    infos = list_plugins(pm)
    if as_json:
        import json

        click.echo(
            json.dumps(
                {
                    "plugins": [
                        {"name": i.name, "origin": i.origin, "hooks": i.hooks, "actions": i.actions}
                        for i in infos
                    ],
                    "actions": [
                        {"name": t.name, "plugin": t.plugin_name, "origin": t.origin}
                        for t in types.values()
                    ],
                },
                indent=2,
            )
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="spop plugins", title_justify="left")
    for column in ("plugin", "from", "hooks", "action types"):
        table.add_column(column, overflow="fold")
    for info in infos:
        table.add_row(info.name, info.origin, ", ".join(info.hooks), ", ".join(info.actions))
    Console().print(table)


# -- spop diag --------------------------------------------------------------------------------
@cli.group("diag")
def diag_group() -> None:
    """Where the diagnostics files are, and what they say."""


def _diag_set(config_path: str | None, hub: bool):  # type: ignore[no-untyped-def]
    """(set name, directory): SPOP_DIAG_DIR, else the file's [diagnostics] dir ([hub] diag_dir for
    the hub), else the platform's user log dir. A directory that is a file: exit 6."""
    import os
    from pathlib import Path

    from .diagnostics import diag_dir

    name = "hub" if hub else "listener"
    directory = None
    if not os.environ.get("SPOP_DIAG_DIR"):
        doc, _, _ = _load_document(config_path)
        section, key = ("hub", "diag_dir") if hub else ("diagnostics", "dir")
        table = doc.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        directory = Path(value).expanduser() if isinstance(value, str) and value else None
    folder = directory or diag_dir()
    if folder.exists() and not folder.is_dir():
        _diag_fail(folder, "not a directory")
    return name, folder


def _diag_fail(folder: object, reason: object) -> None:
    """The set cannot be read: the status a listener gets for the same folder (6)."""
    from .model import Error, ScreenPopError

    fail(
        ScreenPopError(
            Error.SCREENPOP_Cannot_Create_Diags, f"cannot read diagnostics in {folder}: {reason}"
        )
    )


@diag_group.command("path")
@click.option("--hub", is_flag=True, help="The hub's set instead of the listeners'.")
@_config_option
def diag_path(hub: bool, config_path: str | None) -> None:
    """Print the current diagnostics file (`.000`); `.001` and `.002` sit beside it."""
    from .diagnostics import diag_files

    name, directory = _diag_set(config_path, hub)
    click.echo(str(diag_files(name, directory)[0]))


@diag_group.command("tail")
@click.option(
    "-n",
    "--lines",
    "count",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Lines to print.",
)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines, across rotations.")
@click.option("--hub", is_flag=True, help="The hub's set instead of the listeners'.")
@_config_option
def diag_tail(count: int, follow: bool, hub: bool, config_path: str | None) -> None:
    """Print the last lines of the diagnostics set (.002, .001, .000 in order)."""
    import sys

    from .diag_reader import follow as follow_set
    from .diag_reader import last_lines

    name, directory = _diag_set(config_path, hub)
    try:
        for line in last_lines(name, count, directory):
            sys.stdout.write(line)
        sys.stdout.flush()
        if not follow:
            return
        for line in follow_set(name, directory):
            sys.stdout.write(line)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `spop diag tail -f | head`
        pass
    except OSError as exc:  # a file of the set we may not read
        _diag_fail(directory, exc.strerror or exc)


# -- spop status ------------------------------------------------------------------------------
@cli.command("status")
@click.option(
    "--server", default=None, help=SERVER_HELP + " Default: $SPOP_SERVER, [server] address."
)
@click.option("--token", default=None, help="Token the hub requires (default: $SPOP_TOKEN).")
@click.option("--json", "as_json", is_flag=True, help="The hub's status as JSON.")
@click.option(
    "--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the hub."
)
@click.option(
    "--cafile",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="CA to verify a TLS hub.",
)
@_config_option
def status_command(
    server: str | None,
    token: str | None,
    as_json: bool,
    timeout: float,
    cafile: str | None,
    config_path: str | None,
) -> None:
    """Print the hub's listeners and counters."""
    from .client import fetch_status
    from .model import ScreenPopError

    settings = _load_settings(
        config_path, {"server": {"address": server, "token": token, "cafile": cafile}}
    )
    ssl_context = settings.server.ssl_context()
    options = {"ssl_context": ssl_context} if ssl_context else {}
    try:
        data = fetch_status(settings.server.address, settings.server.token, timeout, **options)
    except ScreenPopError as exc:
        fail(exc)
    if as_json:
        import json

        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # What the hub says is shown as Text, never read as markup.
    console = Console()
    facts = ", ".join(
        f"{key} {data[key]}"
        for key in ("version", "uptime", "port", "http_port", "connections", "contacts", "pending")
        if key in data
    )
    console.print(Text(f"hub {settings.server.address}: {facts}"))
    listeners = Table(title="listeners", title_justify="left")
    for column in ("media", "resource", "connections"):
        listeners.add_column(column)
    for row in data.get("listeners", []):
        listeners.add_row(
            *(Text(str(row.get(key, ""))) for key in ("media", "resource", "connections"))
        )
    console.print(listeners)
    counters = Table(title="counters", title_justify="left")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for key, value in sorted((data.get("counters") or {}).items()):
        counters.add_row(Text(str(key)), Text(str(value)))
    console.print(counters)


# -- spop listen ------------------------------------------------------------------------------
@cli.command()
@click.argument("media", required=False, type=click.Choice(MEDIA_WORDS))
@click.argument("resource", required=False)
@click.option(
    "--server",
    default=None,
    help=SERVER_HELP + " Default: $SPOP_SERVER, [server] address, 6000@localhost.",
)
@_config_option
@click.option(
    "--action",
    "action_names",
    multiple=True,
    metavar="NAME",
    help="Action to run on each pop: an [actions.NAME] or an action type (repeatable).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per pop on stdout, nothing else there."
)
@click.option("--once", is_flag=True, help="Exit after one pop has been handled by every action.")
@click.option(
    "--count", type=click.IntRange(min=1), default=None, help="Exit after N distinct pops have been handled."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --once/--count: exit 15 if the pops have not arrived in S seconds; alone: listen S seconds.",
)
@click.option("--token", default=None, help="Token the hub requires (default: $SPOP_TOKEN).")
@click.option(
    "--reconnecting-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds between reconnect attempts, at most (default 30).",
)
@_plugins_dir_option
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the hub to answer.",
)
@click.option(
    "--cafile",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="CA to verify a TLS hub (turns TLS on).",
)
@click.option("--plain", is_flag=True, help="Plain log lines even on a terminal.")
def listen(
    media: str | None,
    resource: str | None,
    server: str | None,
    config_path: str | None,
    action_names: tuple[str, ...],
    as_json: bool,
    once: bool,
    count: int | None,
    timeout: float | None,
    token: str | None,
    reconnecting_interval: float | None,
    plugin_dirs: tuple[str, ...],
    connect_timeout: float,
    cafile: str | None,
    plain: bool,
) -> None:
    """Pop MEDIA RESOURCE's pops (or every [[listeners]] of the config) and run their actions."""
    import os
    import sys

    from .model import ScreenPopError

    if media and not resource:
        raise click.UsageError("MEDIA needs a RESOURCE (the extension or user ID to watch)")
    if once and count not in (None, 1):
        raise click.UsageError("--once and --count disagree")
    target = 1 if once else count
    overrides: dict = {  # type: ignore[type-arg]
        "server": {
            "address": server,
            "token": token,
            "reconnecting_interval": reconnecting_interval,
            "cafile": cafile,
        },
        "plugins": {"dirs": list(plugin_dirs)},
    }
    if media:
        overrides["listeners"] = [{"media": media, "resource": resource, "actions": []}]
    settings = _load_settings(config_path, overrides)
    if not settings.listeners:
        raise click.UsageError(
            "nothing to listen to: give MEDIA RESOURCE, or [[listeners]] in the configuration"
        )
    if settings.diag_dir and not os.environ.get("SPOP_DIAG_DIR"):
        os.environ["SPOP_DIAG_DIR"] = str(
            settings.diag_dir
        )  # where the listener core opens its set
    pm, types = _plugin_manager([str(d) for d in settings.plugin_dirs])
    plans = _listen_plans(settings, types, action_names, as_json)

    from .diagnostics import open_diagnostics

    try:
        logger = open_diagnostics("listener")
    except ScreenPopError as exc:
        fail(exc)
    from .session import ListenSession

    live = sys.stdout.isatty() and not as_json and not plain
    session = ListenSession(
        plans,
        address=settings.server.address,
        token=settings.server.token,
        reconnecting_interval=settings.server.reconnecting_interval,
        ssl_context=settings.server.ssl_context(),
        connect_timeout=connect_timeout,
        count=target,
        plugin_manager=pm,
        logger=logger,
        **({} if live else _plain_callbacks(as_json)),
    )
    try:
        outcome = _run(_listen_until_done(session, timeout=timeout, live=live))
    except KeyboardInterrupt:  # where signal handlers cannot be installed (Windows)
        raise SystemExit(EXIT_OK) from None
    if isinstance(outcome, ScreenPopError):
        fail(outcome)
    reason, drained = outcome
    if not live:
        click.echo(
            f"spop: {session.received} pop(s), {session.failures} action failure(s)", err=True
        )
    if reason == "timeout" and target is not None:
        click.echo(
            f"spop: error: timeout: {session.received} of {target} pop(s) in {timeout:g} s",
            err=True,
        )
        raise SystemExit(EXIT_TIMEOUT)
    if reason == "count" and (session.failures or not drained):
        why = "still running at exit" if not drained else f"{session.failures} failure(s)"
        click.echo(f"spop: error: actions failed: {why}", err=True)
        raise SystemExit(EXIT_ACTION_FAILED)
    raise SystemExit(EXIT_OK)


def _listen_plans(settings, types, extra_actions: tuple[str, ...], as_json: bool):  # type: ignore[no-untyped-def]
    """One plan per listener; each action name built once (its table, or a bare action type)."""
    from .actions import ActionConfigError, configure_action
    from .config import check_config
    from .session import ListenerPlan

    problems = check_config(settings.document, types, settings.sources)
    if problems:
        _config_fail(problems)
    built: dict = {}  # type: ignore[type-arg]
    plans = []
    for entry in settings.listeners:
        names = list(dict.fromkeys([*entry.actions, *extra_actions]))
        for name in names:
            if name in built:
                continue
            if name not in settings.actions and name not in types:
                known = ", ".join(sorted({*settings.actions, *types}))
                click.echo(
                    f"spop: error: config: --action {name}: unknown action (known: {known})",
                    err=True,
                )
                raise SystemExit(EXIT_CONFIG)
            table = dict(settings.actions.get(name, {}))
            if as_json and table.get("plugin", name) in ("print", "url") and "stream" not in table:
                table["stream"] = "stderr"  # --json: nothing but pops on stdout
            try:
                built[name] = configure_action(types, name, table)
            except ActionConfigError as exc:
                click.echo(
                    f"spop: error: config: actions.{name}.{exc.key}: {exc.message}", err=True
                )
                raise SystemExit(EXIT_CONFIG) from None
        plans.append(ListenerPlan(entry.media, entry.resource, [built[n] for n in names]))
    return plans


def _plain_callbacks(as_json: bool) -> dict:  # type: ignore[type-arg]
    """Not a terminal: pops as JSON on stdout (--json), everything else as plain lines on stderr."""
    import sys

    from . import view
    from .actions.json import pop_line as json_line

    def on_pop(listener, pop) -> None:  # type: ignore[no-untyped-def]
        if as_json:
            sys.stdout.write(json_line(pop))
            sys.stdout.flush()
        else:
            click.echo(view.pop_line(listener, pop), err=True)

    def on_status(listener, old, new) -> None:  # type: ignore[no-untyped-def]
        click.echo(view.status_line(listener, old, new), err=True)

    def on_result(listener, action, pop, outcome) -> None:  # type: ignore[no-untyped-def]
        click.echo(view.result_line(listener, action, pop, outcome), err=True)

    return {"on_pop": on_pop, "on_status": on_status, "on_result": on_result}


async def _listen_until_done(session, *, timeout: float | None, live: bool):  # type: ignore[no-untyped-def]
    """Start, wait for the pops (or the timeout, or SIGINT/SIGTERM), drain the actions, shut down.

    Returns (reason, drained), or the ScreenPopError that stopped the start.
    """
    import asyncio
    import signal

    from .model import ScreenPopError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    display = refresher = None
    if live:
        from rich.live import Live

        from .view import render

        display = Live(
            render(session.snapshot()),
            auto_refresh=False,
            redirect_stdout=True,
            redirect_stderr=True,
        )
        display.start(refresh=True)

        async def refresh() -> None:
            while True:
                display.update(render(session.snapshot()), refresh=True)
                await asyncio.sleep(0.25)

        refresher = loop.create_task(refresh())
    try:
        try:
            await session.start()
        except ScreenPopError as exc:
            return exc
        reason = await session.wait(timeout, stop)
        # Ctrl-C means now: give running actions a moment, not their whole time limit.
        grace = (
            session.drain_timeout() if reason != "stopped" else min(session.drain_timeout(), 3.0)
        )
        drained = await session.finish(grace)
        return reason, drained
    finally:
        if refresher is not None:
            refresher.cancel()
        if display is not None:
            display.update(render(session.snapshot()), refresh=True)
            display.stop()
