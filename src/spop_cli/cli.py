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
    try:
        _run(run_hub(config, ready_file=ready_file))
    except OSError as exc:
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
    from .model import Error, ScreenPopError

    if isinstance(exc, ScreenPopError) and exc.code is Error.SCREENPOP_Framework_Error and "hub" not in exc.message:
        click.echo(f"spop: error: rejected by the hub: {exc}", err=True)
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
