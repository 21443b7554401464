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
EXIT_NOT_NOW = 16  # the hub could not take it now (503 journal_unavailable): send it again later


TLS_HINT = (
    "The hub at {address} answered, but TLS failed: turn TLS on ([server] tls = true) and give\n"
    "  the CA that signed its certificate (--cafile FILE or [server] cafile), naming the hub as\n"
    "  its certificate does."
)
# The plain cause and the fix, under the vendor code's message.
HINTS = {
    "SCREENPOP_Cannot_Find_HiPath_ProCenter": (
        "No hub answers there. Is `spop serve` running at {address}?\n"
        "  Start it, or name the hub with --server PORT@HOST, $SPOP_SERVER or [server] address."
    ),
    "SCREENPOP_Initialization_Error": (
        "The hub refused the handshake, or the address is malformed: check the token\n"
        "  (--token, $SPOP_TOKEN or [server] token) and the address ({address})."
    ),
}


def fail(error: Exception, address: str | None = None) -> None:
    """Print an error naming its SCREENPOP code (and, for a hub's address, what to do about it)
    and exit with that code's status."""
    from .model import ScreenPopError

    if isinstance(error, ScreenPopError):
        click.echo(f"spop: error: {error}", err=True)
        hint = HINTS.get(error.code.value)
        if any(word in error.message for word in ("CERTIFICATE", "SSL", "without TLS")):
            hint = TLS_HINT  # something answered: TLS did not agree
        if hint:
            click.echo("  " + hint.format(address=address or "that address"), err=True)
        raise SystemExit(EXIT_CODES.get(error.code.value, 1))
    click.echo(f"spop: error: {error}", err=True)
    raise SystemExit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(__version__, prog_name="spop")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """spop: screen pops for contact centers (hub, listeners, actions).

    \b
    Try it:  spop demo
    A hub:   spop serve
    A desk:  spop listen telephone 13579
    A pop:   spop send telephone 13579 --source 0612345678
    """
    if ctx.invoked_subcommand is None:  # bare `spop`: the help, and success
        click.echo(ctx.get_help())
        ctx.exit(EXIT_OK)


def main() -> None:
    cli(prog_name="spop")


# --- hub, sources, demo (lead) -------------------------------------------------------------

CONFIG_HELP = (
    "Configuration file (default: $SPOP_CONFIG, else spop/config.toml in the user config dir)."
)
MEDIA_WORDS = ["telephone", "callback", "email", "webcollab"]
MEDIA_CHOICE = click.Choice(MEDIA_WORDS)

# One short example per command, under its --help (\b keeps click from rewrapping the lines).
EXAMPLES = {
    "serve": "\b\nExamples:\n  spop serve\n  spop serve --verbose --port 6000 --http-port 6080",
    "listen": (
        "\b\nExamples:\n  spop listen telephone 13579 --server 6000@localhost\n"
        "  spop listen telephone 13579 --action print\n"
        "  spop listen email agent7 --once --json --timeout 60"
    ),
    "send": (
        "\b\nExamples:\n  spop send telephone 13579 --source 0612345678 --queue Ventes\n"
        "  spop send email agent7 --source client@example.org --data ticket=T-42"
    ),
    "simulate": "\b\nExamples:\n  spop simulate --list\n  spop simulate consultation --server 6000@localhost",
    "demo": "\b\nExample:\n  spop demo --delay 1",
    "status": "\b\nExamples:\n  spop status\n  spop status --server 6000@hub.example --json",
    "plugins": "\b\nExamples:\n  spop plugins\n  spop plugins --plugins-dir ./plugins --json",
    "config": "\b\nExamples:\n  spop config init\n  spop config show\n  spop config check --config desk.toml",
    "config init": "\b\nExample:\n  spop config init ~/.config/spop/config.toml",
    "config show": "\b\nExample:\n  spop config show --config desk.toml",
    "config check": "\b\nExample:\n  spop config check --config desk.toml",
    "diag": "\b\nExamples:\n  spop diag path\n  spop diag tail -f --hub",
    "diag path": "\b\nExample:\n  spop diag path --hub",
    "diag tail": "\b\nExamples:\n  spop diag tail -n 50\n  spop diag tail -f --hub",
}


def _config_option(fn):  # type: ignore[no-untyped-def]
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), default=None, help=CONFIG_HELP
    )(fn)


SERVER_HELP = "Hub address: PORT@HOST (the guide's form), HOST:PORT or [v6]:PORT; several hubs: 6000@a,6000@b."
# Every command finds the hub one way (`_hub`): option > environment > [server] > default.
HUB_DEFAULT = (
    "  [default: $SPOP_SERVER, else [server] address of the config file, else 6000@localhost]"
)
TOKEN_HELP = "Token the hub requires.  [default: $SPOP_TOKEN, else [server] token]"
CAFILE_HELP = "CA to verify a TLS hub (turns TLS on).  [default: [server] cafile]"


def _hub_server_option(fn):  # type: ignore[no-untyped-def]
    return click.option(
        "--server", default=None, metavar="PORT@HOST", help=SERVER_HELP + HUB_DEFAULT
    )(fn)


def _hub_token_option(fn):  # type: ignore[no-untyped-def]
    return click.option("--token", default=None, help=TOKEN_HELP)(fn)


def _server_option(fn):  # type: ignore[no-untyped-def]
    """Deprecated: reads only --server/$SPOP_SERVER. Use _hub_server_option and `_hub()`."""
    return click.option(
        "--server",
        envvar="SPOP_SERVER",
        default="6000@localhost",
        show_default=True,
        help=SERVER_HELP,
    )(fn)


def _token_option(fn):  # type: ignore[no-untyped-def]
    """Deprecated: reads only --token/$SPOP_TOKEN. Use _hub_token_option and `_hub()`."""
    return click.option(
        "--token", envvar="SPOP_TOKEN", default=None, help="Token the hub requires."
    )(fn)


def _cafile_option(fn):  # type: ignore[no-untyped-def]
    return click.option(
        "--cafile", type=click.Path(exists=True, dir_okay=False), default=None, help=CAFILE_HELP
    )(fn)


def _hub(config_path: str | None, server: str | None, token: str | None, cafile: str | None):  # type: ignore[no-untyped-def]
    """The hub's address, token and TLS for any command: --option > SPOP_* > [server] > default."""
    settings = _load_settings(
        config_path, {"server": {"address": server, "token": token, "cafile": cafile}}
    )
    return settings.server


def _run(coro):  # type: ignore[no-untyped-def]
    """Run a coroutine on uvloop where installed, else asyncio."""
    import asyncio

    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@cli.command(epilog=EXAMPLES["serve"])
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1: loopback only).")
@click.option(
    "--port", type=int, default=None, help="Listener port (default 6000; 0 picks a free one)."
)
@click.option(
    "--http-port",
    type=int,
    default=None,
    help="HTTP port (default 6080; 0 picks a free one; -1 disables).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="SPOP_CONFIG",
    help="Configuration file ([hub] section).",
)
@click.option(
    "--token", envvar="SPOP_TOKEN", default=None, help="Token listeners (and sources) must present."
)
@click.option(
    "--source-token",
    envvar="SPOP_SOURCE_TOKEN",
    default=None,
    help="Separate token for publishing; desktops with --token then cannot publish.",
)
@click.option(
    "--journal",
    type=click.Path(dir_okay=False),
    default=None,
    help="SQLite journal of accepted pops (default: the user state dir).",
)
@click.option("--no-journal", is_flag=True, help="Keep pops in memory only.")
@click.option(
    "--pop-ttl", type=float, default=None, help="Seconds an undelivered pop is kept (default 120)."
)
@click.option(
    "--dedupe-window",
    type=float,
    default=None,
    help="Seconds a pop id stays a duplicate (default 120).",
)
@click.option(
    "--heartbeat", type=float, default=None, help="Seconds between heartbeats (default 10)."
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="PEM certificate: TLS on both ports.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="PEM private key for --tls-cert.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the bound ports as JSON here once listening.",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="A line per pop and per listener registration on standard output.",
)
def serve(
    config_path: str | None,
    ready_file: str | None,
    no_journal: bool,
    verbose: bool,
    **options: object,
) -> None:
    """Run the hub: the listener port, the HTTP port, the journal."""
    from .serve import ServeError, build_hub_config, build_sources, run_hub

    try:
        config = build_hub_config(config_path, no_journal=no_journal, **options)
        sources = build_sources(config_path)
    except ServeError as exc:
        click.echo(f"spop: error: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    for warning in config_warnings(config):
        click.echo(f"spop: warning: {warning}", err=True)
    import sqlite3
    import ssl
    from pathlib import Path

    from .hub.journal_guard import JournalOpenError
    from .model import ScreenPopError

    def journal_fails(reason: object) -> None:
        click.echo(
            f"spop: error: hub.journal: cannot open the journal {config.journal}: {reason}",
            err=True,
        )
        raise SystemExit(EXIT_CONFIG) from None

    from .hub.nats_delivery import NatsUnavailable

    try:
        _run(run_hub(config, ready_file=ready_file, verbose=verbose, sources=sources))
    except NatsUnavailable as exc:  # backend = "nats": no server answers, or no nats-py
        message = str(exc)  # names its setting, or it is about the servers
        if not message.startswith("hub."):
            message = f"hub.nats_servers: {message}"
        click.echo(f"spop: error: {message}", err=True)
        raise SystemExit(EXIT_CONFIG if exc.config else 1) from None
    except JournalOpenError as exc:  # in use by another hub, another program's file
        click.echo(f"spop: error: hub.journal: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
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


@cli.command(epilog=EXAMPLES["send"])
@click.argument("media", type=MEDIA_CHOICE, metavar="MEDIA")
@click.argument("resource")
@_hub_server_option
@_hub_token_option
@_config_option
@click.option("--source", default=None, help="Caller's number, customer's address, account or IP.")
@click.option(
    "--destination", default=None, help="Number dialled, address written to, or destination."
)
@click.option("--queue", "queue_name", default=None, help="Queue name.")
@click.option("--description", "contact_description", default=None, help="Contact description.")
@click.option("--from", "from_", default=None, help="Extension that transferred or consulted.")
@click.option("--redirect", default=None, help="Number the call was forwarded or deflected from.")
@click.option(
    "--wait", "wait_time", type=click.IntRange(min=0), default=None, help="Wait time in seconds."
)
@click.option(
    "--data",
    multiple=True,
    metavar="KEY=VALUE",
    help="Contact data (repeatable; the value may contain '=').",
)
@click.option("--contact-id", default=None, help="Contact the pop belongs to.")
@click.option(
    "--id", "pop_id", default=None, help="Pop id, so a resend is recognised as the same pop."
)
@click.option(
    "--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the hub."
)
@_cafile_option
def send(
    media: str,
    resource: str,
    server: str | None,
    token: str | None,
    config_path: str | None,
    data: tuple[str, ...],
    pop_id: str | None,
    contact_id: str | None,
    timeout: float,
    cafile: str | None,
    from_: str | None,
    **fields: object,
) -> None:
    """Send one pop to the listeners of MEDIA RESOURCE; exit 0 once the hub has accepted it.

    MEDIA is telephone, callback, email or webcollab; RESOURCE the extension or user ID.
    On a terminal it says what was accepted; in a pipe it prints the pop id alone.
    """
    import sys

    from . import client

    fields["from"] = from_
    fields["id"] = pop_id
    fields["contact_id"] = contact_id
    pop = _pop_fields(media, resource, fields, data)
    hub = _hub(config_path, server, token, cafile)
    try:
        ids = _run(
            client.publish(
                hub.address, pop, token=hub.token, timeout=timeout, ssl_context=hub.ssl_context()
            )
        )
    except Exception as exc:  # noqa: BLE001 - every failure is reported with its code
        _fail_send(exc, hub.address)
    if sys.stdout.isatty():
        click.echo(f"pop id {ids[0]}: accepted by the hub at {hub.address} for {media} {resource}")
    else:  # `id=$(spop send …)`
        click.echo(ids[0])


def _client_ssl(cafile: str | None):  # type: ignore[no-untyped-def]
    if not cafile:
        return None
    import ssl

    return ssl.create_default_context(cafile=cafile)


def _fail_send(exc: Exception, address: str | None = None) -> None:
    from .client import Rejected

    if isinstance(exc, Rejected) and exc.detail.get("error") == "journal_unavailable":
        # not a refusal of the input: the hub (its journal, its link to NATS) could not take it
        click.echo(
            f"spop: error: the hub cannot take it now (journal_unavailable): {exc}", err=True
        )
        raise SystemExit(EXIT_NOT_NOW)
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
    fail(exc, address)


@cli.command(epilog=EXAMPLES["simulate"])
@click.argument("scenario", required=False)
@click.option("--list", "list_them", is_flag=True, help="List the built-in scenarios and exit.")
@_hub_server_option
@_hub_token_option
@_config_option
@click.option("--realtime", is_flag=True, help="Wait the scenario's delays for real.")
@click.option(
    "--contact-prefix", default=None, help="Prefix contact ids (default: a fresh one per run)."
)
@click.option(
    "--timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for the hub to answer each request.",
)
@_cafile_option
@click.option("--json", "as_json", is_flag=True, help="Print the hub's answer as JSON.")
def simulate(
    scenario: str | None,
    list_them: bool,
    server: str | None,
    token: str | None,
    config_path: str | None,
    realtime: bool,
    contact_prefix: str | None,
    timeout: float,
    cafile: str | None,
    as_json: bool,
) -> None:
    """Play SCENARIO (a built-in name, see --list, or a scenario file) as contact events."""
    from pathlib import Path

    from .scenario import builtin_names, load_scenario
    from .simulate import play

    if list_them:
        _list_scenarios()
        return
    if scenario is None:
        raise click.UsageError("give a SCENARIO (spop simulate --list shows the built-in ones)")
    if scenario not in builtin_names() and not Path(scenario).is_file():
        raise click.BadParameter(
            "no such built-in scenario or file (spop simulate --list shows the built-in ones)",
            param_hint=f"SCENARIO {scenario!r}",
        )
    try:
        loaded = load_scenario(scenario)
    except (OSError, ValueError) as exc:  # a file that is not a valid scenario
        click.echo(f"spop: error: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    hub = _hub(config_path, server, token, cafile)
    try:
        result = _run(
            play(
                loaded,
                hub.address,
                token=hub.token,
                realtime=realtime,
                prefix=contact_prefix,
                timeout=timeout,
                ssl_context=hub.ssl_context(),
            )
        )
    except Exception as exc:  # noqa: BLE001
        _fail_send(exc, hub.address)
    if as_json:
        import json

        click.echo(json.dumps(result))
    else:
        events, pops = result["applied"], len(result["pops"])
        click.echo(f"{loaded.name}: {_plural(events, 'event')} applied, {_plural(pops, 'pop')}")


def _plural(count: int, word: str) -> str:
    """`1 pop`, `2 pops`, `0 pops`."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _list_scenarios() -> None:
    from .scenario import builtin_names, load_scenario

    for name in builtin_names():
        click.echo(f"{name:<28} {load_scenario(name).description}")


@cli.command(epilog=EXAMPLES["demo"])
@click.option(
    "--delay", type=float, default=0.4, show_default=True, help="Seconds between the demo's steps."
)
def demo(delay: float) -> None:
    """A whole contact center in one process: hub, listeners, the guide's scenarios, then exit."""
    from .demo import run_demo

    raise SystemExit(_run(run_demo(delay=delay)))


# --- listen, config, plugins, diag, status (helper B) --------------------------------------


def _plugins_dir_option(fn):  # type: ignore[no-untyped-def]
    return click.option(
        "--plugins-dir",
        "plugin_dirs",
        multiple=True,
        type=click.Path(exists=True, file_okay=False),
        help="Folder of plugin modules to load (repeatable; adds to [plugins] dirs).",
    )(fn)


def _config_fail(problems) -> None:  # type: ignore[no-untyped-def]
    """Report every configuration problem, then exit EXIT_CONFIG.

    A hub address that cannot be parsed (from --server, $SPOP_SERVER or [server] address) is
    the vendor's SCREENPOP_Initialization_Error, exit 5, as when `initialize` is given one.
    """
    for problem in problems:
        click.echo(f"spop: error: config: {problem}", err=True)
    if any(problem.path == "server.address" for problem in problems):
        raise SystemExit(EXIT_CODES["SCREENPOP_Initialization_Error"])
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
@cli.group("config", epilog=EXAMPLES["config"])
def config_group() -> None:
    """Write, show and check the configuration file."""


@config_group.command("init", epilog=EXAMPLES["config init"])
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


@config_group.command("show", epilog=EXAMPLES["config show"])
@_config_option
@click.option("--secrets", is_flag=True, help="Show tokens instead of ********.")
def config_show(config_path: str | None, secrets: bool) -> None:
    """Print the merged settings (file, environment, defaults) as TOML.

    A section or key spop does not know (a typo: it would be ignored) is named on standard
    error, and the exit status is 12.
    """
    from .config import show_config, validate

    doc, path, sources = _load_document(config_path)
    from_env = sorted({origin for origin in sources.values() if origin.startswith("SPOP_")})
    click.echo(f"# file: {path or 'none (defaults)'}")
    if from_env:
        click.echo(f"# environment: {', '.join(from_env)}")
    click.echo(show_config(doc, secrets=secrets), nl=False)
    unknown = [
        p
        for p in validate(doc, sources)
        if p.message.startswith(("unknown key", "unknown section"))
    ]
    if unknown:
        for problem in unknown:
            click.echo(f"spop: error: config: {problem}", err=True)
        click.echo(
            f"spop: error: {_plural(len(unknown), 'unknown name')} in {path or 'defaults'}"
            " (spop config check lists every problem)",
            err=True,
        )
        raise SystemExit(EXIT_CONFIG)


@config_group.command("check", epilog=EXAMPLES["config check"])
@_config_option
@_plugins_dir_option
def config_check(config_path: str | None, plugin_dirs: tuple[str, ...]) -> None:
    """Validate the configuration; list every problem with its key and value (exit 12).

    Warnings (risky but valid settings) are listed too, and leave the exit status alone.
    """
    from .config import Problem, review_config, review_sources
    from .plugins import PluginError, action_types, get_plugin_manager, source_types

    doc, path, sources = _load_document(config_path)
    problems = []
    types = None
    try:
        pm = get_plugin_manager(_existing(_plugin_dirs_of(doc, plugin_dirs)))
        types = action_types(pm)
        problems.extend(review_sources(doc, source_types(pm)))
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
        click.echo(f"spop: error: {_plural(len(problems), 'problem')} in {where}", err=True)
        raise SystemExit(EXIT_CONFIG)
    listeners, actions = len(doc.get("listeners", [])), len(doc.get("actions", {}))
    warned = f", {_plural(len(warnings), 'warning')}" if warnings else ""
    click.echo(
        f"{where}: ok ({_plural(listeners, 'listener')}, {_plural(actions, 'action')}{warned})"
    )


def _existing(dirs: list[str]) -> list[str]:
    from pathlib import Path

    return [d for d in dirs if Path(d).expanduser().is_dir()]


# -- spop plugins -----------------------------------------------------------------------------
@cli.command("plugins", epilog=EXAMPLES["plugins"])
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
                        {
                            "name": i.name,
                            "origin": i.origin,
                            "hooks": i.hooks,
                            "actions": i.actions,
                            "sources": i.sources,
                        }
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
    # One block per plugin, each name and path whole on its line: a table's narrow columns
    # would cut module names and paths mid-word.
    for number, info in enumerate(infos):
        if number:
            click.echo("")
        click.echo(click.style(info.name, bold=True))
        click.echo(f"  from          {info.origin}")
        click.echo(f"  action types  {', '.join(info.actions) or '-'}")
        click.echo(f"  source types  {', '.join(info.sources) or '-'}")
        click.echo(f"  hooks         {', '.join(info.hooks) or '-'}")


# -- spop diag --------------------------------------------------------------------------------
@cli.group("diag", epilog=EXAMPLES["diag"])
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


@diag_group.command("path", epilog=EXAMPLES["diag path"])
@click.option("--hub", is_flag=True, help="The hub's set instead of the listeners'.")
@_config_option
def diag_path(hub: bool, config_path: str | None) -> None:
    """Print the current diagnostics file (`.000`); `.001` and `.002` sit beside it."""
    from .diagnostics import diag_files

    name, directory = _diag_set(config_path, hub)
    click.echo(str(diag_files(name, directory)[0]))


@diag_group.command("tail", epilog=EXAMPLES["diag tail"])
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
    from .diag_reader import tail

    name, directory = _diag_set(config_path, hub)
    handle = None
    try:
        lines, handle = tail(name, count, directory)
        for line in lines:
            sys.stdout.write(line)
        sys.stdout.flush()
        if not follow:
            return
        # From where the last lines ended: a line written meanwhile is not lost. No `.000` yet:
        # read it from its start once it appears.
        for line in follow_set(name, directory, start=handle, from_end=False):
            sys.stdout.write(line)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `spop diag tail -f | head`
        pass
    except OSError as exc:  # a file of the set we may not read
        _diag_fail(directory, exc.strerror or exc)
    finally:
        if handle is not None and not handle.closed:
            handle.close()


# -- spop status ------------------------------------------------------------------------------
@cli.command("status", epilog=EXAMPLES["status"])
@_hub_server_option
@_hub_token_option
@click.option("--json", "as_json", is_flag=True, help="The hub's status as JSON.")
@click.option(
    "--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the hub."
)
@_cafile_option
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

    hub = _hub(config_path, server, token, cafile)
    ssl_context = hub.ssl_context()
    options = {"ssl_context": ssl_context} if ssl_context else {}
    try:
        data = fetch_status(hub.address, hub.token, timeout, **options)
    except ScreenPopError as exc:
        fail(exc, hub.address)
    if as_json:
        import json

        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console

    from .status_view import render_status

    Console().print(render_status(hub.address, data))


# -- spop listen ------------------------------------------------------------------------------
@cli.command(epilog=EXAMPLES["listen"])
@click.argument("media", required=False, type=MEDIA_CHOICE, metavar="[MEDIA]")
@click.argument("resource", required=False)
@_hub_server_option
@_config_option
@click.option(
    "--action",
    "action_names",
    multiple=True,
    metavar="NAME",
    help="Action to run on each pop: an [actions.NAME] or an action type (repeatable).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON object per pop, and one per contact change ("type": "change"), on stdout, nothing else there.',
)
@click.option("--once", is_flag=True, help="Exit after one pop has been handled by every action.")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Exit after N distinct pops have been handled.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --once/--count: exit 15 if the pops have not arrived in S seconds; alone: listen S seconds.",
)
@_hub_token_option
@click.option(
    "--reconnecting-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds between reconnect attempts, at most (default 30).",
)
@click.option(
    "--spread/--no-spread",
    default=None,
    help="Several hubs in --server: start at this desktop's own hub (by host and user), "
    "not the first, so a site's desktops share the hubs.",
)
@_plugins_dir_option
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the hub to answer.",
)
@_cafile_option
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
    spread: bool | None,
    plugin_dirs: tuple[str, ...],
    connect_timeout: float,
    cafile: str | None,
    plain: bool,
) -> None:
    """Pop MEDIA RESOURCE's pops (or every [[listeners]] of the config) and run their actions.

    On a terminal: a live view, each pop a card with all its fields. Otherwise: plain lines on
    standard error (pops on standard output with --json).
    """
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
            "spread": spread,
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
        spread=settings.server.spread,
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
        fail(outcome, settings.server.address)
    reason, drained = outcome
    if not live:
        click.echo(
            f"spop: {_plural(session.received, 'pop')}, {_plural(session.failures, 'action failure')}",
            err=True,
        )
    if reason == "timeout" and target is not None:
        click.echo(
            f"spop: error: timeout: {session.received} of {_plural(target, 'pop')} in {timeout:g} s",
            err=True,
        )
        raise SystemExit(EXIT_TIMEOUT)
    if reason == "count" and (session.failures or not drained):
        why = "still running at exit" if not drained else _plural(session.failures, "failure")
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
    from .actions.json import change_line as json_change_line
    from .actions.json import pop_line as json_line

    def on_pop(listener, pop) -> None:  # type: ignore[no-untyped-def]
        if as_json:
            # Flushed by `before_acks`, before the acks of the read it came in leave: the line
            # is out before the hub hears the pop was handled, one write for the read's lines.
            sys.stdout.write(json_line(pop))
        else:
            click.echo(view.pop_line(listener, pop), err=True)

    def on_status(listener, old, new) -> None:  # type: ignore[no-untyped-def]
        click.echo(view.status_line(listener, old, new), err=True)

    def on_result(listener, action, pop, outcome) -> None:  # type: ignore[no-untyped-def]
        click.echo(view.result_line(listener, action, pop, outcome), err=True)

    def on_change(listener, change) -> None:  # type: ignore[no-untyped-def]
        if as_json:  # one line per change; `"type": "change"` tells it from a pop's line
            sys.stdout.write(json_change_line(change))  # flushed before its ack, as a pop's
        else:
            click.echo(view.change_line(listener, change), err=True)

    callbacks = {
        "on_pop": on_pop,
        "on_status": on_status,
        "on_result": on_result,
        "on_change": on_change,
    }
    if as_json:
        callbacks["before_acks"] = sys.stdout.flush
    return callbacks


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
    view = None
    try:
        try:
            if live:  # a transient spinner while connecting: no empty view left above an error
                from rich.console import Console

                with Console(stderr=True).status(f"connecting to the hub at {session.address} …"):
                    await session.start()
                from .live_view import LiveView

                view = LiveView(session)
                view.start()
            else:
                await session.start()
        except ScreenPopError as exc:
            return exc
        # The listeners, their links and actions live until the end: out of the full garbage
        # collections, which otherwise walk them all (tens of ms with 1,000 listeners).
        import gc

        gc.collect()
        gc.freeze()
        reason = await session.wait(timeout, stop)
        # Ctrl-C means now: give running actions a moment, not their whole time limit.
        grace = (
            session.drain_timeout() if reason != "stopped" else min(session.drain_timeout(), 3.0)
        )
        drained = await session.finish(grace)
        return reason, drained
    finally:
        if view is not None:
            await view.stop()


# -- spop source ------------------------------------------------------------------------------
@cli.command("source")
@click.argument("name", required=False)
@_config_option
@_plugins_dir_option
@click.option(
    "--list",
    "list_types",
    is_flag=True,
    help="List the installed source types and the configured sources.",
)
@click.option(
    "--check", is_flag=True, help="Try the source's link (log in, show what it sees) and exit."
)
@_hub_server_option
@_hub_token_option
@click.option(
    "--listen",
    default=None,
    help="HOST:PORT for a webhook source's own HTTP port (default [sources.NAME] listen, else 127.0.0.1:6081).",
)
def source_command(
    name: str | None,
    config_path: str | None,
    plugin_dirs: tuple[str, ...],
    list_types: bool,
    check: bool,
    server: str | None,
    token: str | None,
    listen: str | None,
) -> None:
    """Run one source beside a hub: a PBX or a webhook receiver that sends contact events.

    NAME is a [sources.NAME] table of the config file, or a source type with its defaults.

    \b
    Examples:
      spop source --list
      spop source asterisk --config /etc/spop/source.toml
      spop source asterisk --check
    """
    from .plugins import PluginError, source_types
    from .sources import SourceError, configured_sources, make_source

    overrides: dict = {"server": {}}  # type: ignore[type-arg]
    if server:
        overrides["server"]["address"] = server
    if token:
        overrides["server"]["token"] = token
    settings = _load_settings(config_path, overrides)
    pm, _ = _plugin_manager([*map(str, settings.plugin_dirs), *plugin_dirs])
    try:
        types = source_types(pm)
    except PluginError as exc:
        click.echo(f"spop: error: plugins: {exc}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    configured = configured_sources(settings.document)
    if list_types or not name:
        if not name and not list_types:
            click.echo("spop: error: name a source to run, or use --list", err=True)
            raise SystemExit(EXIT_USAGE)
        for kind in sorted(types):
            t = types[kind]
            click.echo(f"{kind:<12} {t.description or '-'}  ({t.origin}, {t.plugin_name})")
        for source_name, table in configured.items():
            state = "" if table.get("enabled", True) else ", disabled in spop serve"
            click.echo(f"[sources.{source_name}] type {table['type']}{state}")
        if not types:
            click.echo("no source types installed")
        return
    table = configured.get(name, {"type": name})
    try:
        source = make_source(types, name, table)
    except SourceError as exc:
        key = f"sources.{name}.{exc.key}" if exc.key else f"sources.{name}"
        click.echo(f"spop: error: config: {key}: {exc.message}", err=True)
        raise SystemExit(EXIT_CONFIG) from None
    import logging

    from .diagnostics import open_diagnostics

    log = open_diagnostics("source", settings.diag_dir)
    echo = logging.StreamHandler()  # what the diagnostics file gets, on stderr too
    echo.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(echo)
    if check:
        from .sources import RemoteSink, SourceContext

        async def run_check() -> bool:
            ctx = SourceContext(RemoteSink(settings.server.address), log, name)
            return await source.check(ctx, click.echo)

        try:
            ok = _run(run_check())
        except SourceError as exc:  # the table cannot be used (no AMI secret, say): not the link
            click.echo(f"spop: error: {name}: {exc}", err=True)
            raise SystemExit(EXIT_CONFIG) from None
        raise SystemExit(EXIT_OK if ok else EXIT_CODES["SCREENPOP_Cannot_Find_HiPath_ProCenter"])
    from .sources.standalone import run_standalone

    def ready(port: object) -> None:
        where = f", webhooks on port {port}" if port is not None else ""
        click.echo(f"spop source {name}: sending to {settings.server.address}{where}", err=True)

    try:
        _run(
            run_standalone(
                name,
                source,
                address=settings.server.address,
                token=settings.server.token,
                ssl_context=settings.server.ssl_context(),
                listen=listen or table.get("listen"),
                log=log,
                ready=ready,
            )
        )
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        click.echo(f"spop: error: cannot listen: {exc}", err=True)
        raise SystemExit(1) from None
