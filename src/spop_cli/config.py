"""Settings built in one place: command line > environment > config file > defaults.

The merged result keeps the TOML file's shape (a plain dict), so `spop config show` prints it and
`check_config` names the exact key path and value at fault: `listeners[0].media = "fax": …`.
Read with tomllib, written with tomli-w.
"""

from __future__ import annotations

import copy
import json
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model import Media, ScreenPopError, validate_resource

DEFAULT_ADDRESS = "6000@localhost"
ENVIRONMENT = {  # variable → key path it sets
    "SPOP_SERVER": ("server", "address"),
    "SPOP_TOKEN": ("server", "token"),
    "SPOP_DIAG_DIR": ("diagnostics", "dir"),
}
# in [server], [hub] and [sources.NAME], any key naming one of these is hidden by `config show`
# (token, source_token, nats_token, a source's auth_token or secret…)
SECRET_WORDS = ("secret", "token", "password")
_MISSING = object()


def defaults() -> dict[str, Any]:
    """The settings when nothing else says otherwise, in the file's shape."""
    return {
        "server": {"address": DEFAULT_ADDRESS, "reconnecting_interval": 30},
        "plugins": {"dirs": []},
        "diagnostics": {},
        "hub": {
            "host": "127.0.0.1",
            "port": 6000,
            "http_port": 6080,
            "pop_ttl": 120,
            "dedupe_window": 120,
        },
        "listeners": [],
        "actions": {},
        "sources": {},
    }


def default_config_path() -> Path:
    """The platform's user config dir: `~/.config/spop/config.toml` on Linux."""
    import platformdirs

    return Path(platformdirs.user_config_dir("spop", appauthor=False)) / "config.toml"


# -- problems ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One thing wrong, with the key path and the value at fault."""

    path: str
    message: str
    value: Any = _MISSING
    origin: str = ""  # where the value came from, when not the file

    def __str__(self) -> str:
        where = self.path
        if self.value is not _MISSING:
            where += f" = {_show(self.value)}"
        if self.origin:
            where += f" (from {self.origin})"
        return f"{where}: {self.message}" if where else self.message


class ConfigError(Exception):
    """The configuration cannot be used; `.problems` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def _show(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


# -- typed view --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerSettings:
    """How listeners and `spop status` reach the hub."""

    address: str = DEFAULT_ADDRESS
    reconnecting_interval: float = 30.0
    token: str | None = None
    tls: bool = False
    cafile: str | None = None
    spread: bool = False  # several hubs: each desktop its own order (listener/core.py)

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS to the hub when `tls` or `cafile` is set; `cafile` names the CA to trust."""
        if not (self.tls or self.cafile):
            return None
        return ssl.create_default_context(cafile=self.cafile)


@dataclass(frozen=True)
class HubSettings:
    """`spop serve` options from `[hub]`, validated; the names are HubConfig's.

    `options` holds every `[hub]` key (defaults included), ready for `HubConfig(**options)`.
    """

    host: str = "127.0.0.1"
    port: int = 6000
    http_port: int = 6080  # -1: no HTTP port
    token: str | None = None
    source_token: str | None = None
    journal: str | None = None  # None: serve's default location
    pop_ttl: float = 120.0
    dedupe_window: float = 120.0
    tls_cert: str | None = None
    tls_key: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ListenerSettings:
    media: str
    resource: str
    actions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Settings:
    """Everything spop reads from outside, merged once."""

    config_path: Path | None
    document: dict[str, Any]  # the merged settings, in the file's shape
    sources: dict[str, str]  # key path → "command line", "SPOP_SERVER", the file, "default"
    server: ServerSettings
    hub: HubSettings
    plugin_dirs: list[Path]
    diag_dir: Path | None
    listeners: list[ListenerSettings]
    actions: dict[str, dict[str, Any]]


def settings_from_document(
    doc: dict[str, Any], config_path: Path | None, sources: dict[str, str]
) -> Settings:
    """The typed view of a merged document that `validate` found no problem in."""
    server, hub = doc["server"], doc["hub"]
    diag = doc["diagnostics"].get("dir")
    return Settings(
        config_path=config_path,
        document=doc,
        sources=sources,
        server=ServerSettings(
            address=server["address"],
            reconnecting_interval=float(server["reconnecting_interval"]),
            token=server.get("token") or None,
            tls=bool(server.get("tls", False)),
            cafile=server.get("cafile"),
            spread=bool(server.get("spread", False)),
        ),
        hub=HubSettings(**{k: v for k, v in hub.items() if k in HUB_FIELDS}, options=dict(hub)),
        plugin_dirs=[Path(d) for d in doc["plugins"]["dirs"]],
        diag_dir=Path(diag).expanduser() if diag else None,
        listeners=[
            ListenerSettings(entry["media"], entry["resource"], list(entry.get("actions", [])))
            for entry in doc["listeners"]
        ],
        actions={name: dict(table) for name, table in doc["actions"].items()},
    )


# -- reading and merging -------------------------------------------------------------------------
def config_path_from(
    option: str | Path | None, environ: Mapping[str, str] | None = None
) -> tuple[Path, bool]:
    """The file to read and whether it was asked for (`--config`, `SPOP_CONFIG`) or is the default."""
    environ = os.environ if environ is None else environ
    if option:
        return Path(option).expanduser(), True
    if environ.get("SPOP_CONFIG"):
        return Path(environ["SPOP_CONFIG"]).expanduser(), True
    return default_config_path(), False


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse one TOML file; a syntax error becomes a ConfigError naming the file and line."""
    try:
        with open(path, "rb") as file:
            doc = tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not valid TOML: {exc}")]) from None
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read: {exc.strerror or exc}")]) from None
    # Plugin folders, and the programs and folders of `command` actions, are relative to the
    # file that names them: a listener started from another folder (a service) finds them too.
    dirs = doc.get("plugins", {}).get("dirs") if isinstance(doc.get("plugins"), dict) else None
    if isinstance(dirs, list):
        doc["plugins"]["dirs"] = [_beside(path, d) for d in dirs]
    actions = doc.get("actions")
    for name, table in actions.items() if isinstance(actions, dict) else ():
        if not isinstance(table, dict) or table.get("plugin", name) != "command":
            continue
        argv = table.get("argv")
        if isinstance(argv, list) and argv and isinstance(argv[0], str) and _is_path(argv[0]):
            argv[0] = _beside(path, argv[0])
        if isinstance(table.get("cwd"), str):
            table["cwd"] = _beside(path, table["cwd"])
    return doc


def _is_path(program: str) -> bool:
    """`./on-pop.sh`, `hooks/x`: a path; `notify-send`: a name looked up on PATH; `{x}`: a template."""
    return ("/" in program or os.sep in program) and "{" not in program


def _beside(config_file: Path, value: Any) -> Any:
    """A relative path as seen from the configuration file's folder; anything else unchanged."""
    if not isinstance(value, str) or Path(value).expanduser().is_absolute():
        return value
    # absolute: `--config c.toml` has the folder "." and `./x.sh` would become `x.sh`, a name
    # looked up on PATH
    return str((config_file.absolute().parent / value).expanduser())


def load_document(
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], Path | None, dict[str, str]]:
    """Merge defaults < file < environment < `overrides`; return (document, file read, sources).

    Tables merge key by key; arrays replace, except `plugins.dirs`, where the command line adds.
    """
    environ = os.environ if environ is None else environ
    path, asked = config_path_from(config, environ)
    doc = defaults()
    sources: dict[str, str] = {}
    _record(sources, doc, "default")
    read_from: Path | None = None
    if path.exists() or asked:
        if not path.exists():
            raise ConfigError([Problem(str(path), "config file not found")])
        file_doc = read_config_file(path)
        _overlay(doc, file_doc, sources, str(path))
        read_from = path
    for variable, (section, key) in ENVIRONMENT.items():
        if environ.get(variable):
            doc.setdefault(section, {})[key] = environ[variable]
            sources[f"{section}.{key}"] = variable
    if environ.get("SPOP_TOKEN") and isinstance(doc.get("hub"), dict):
        doc["hub"]["token"] = environ["SPOP_TOKEN"]
        sources["hub.token"] = "SPOP_TOKEN"
    if environ.get("SPOP_SOURCE_TOKEN") and isinstance(doc.get("hub"), dict):
        doc["hub"]["source_token"] = environ["SPOP_SOURCE_TOKEN"]  # what `spop serve` takes
        sources["hub.source_token"] = "SPOP_SOURCE_TOKEN"
    if overrides:
        extra_dirs = (overrides.get("plugins") or {}).get("dirs")
        rest = {k: v for k, v in overrides.items() if k != "plugins"}
        _overlay(doc, rest, sources, "command line")
        if extra_dirs:
            current = doc["plugins"].get("dirs") if isinstance(doc.get("plugins"), dict) else None
            doc.setdefault("plugins", {})["dirs"] = [
                *(current if isinstance(current, list) else []),
                *map(str, extra_dirs),
            ]
            sources["plugins.dirs"] = "command line"
    return doc, read_from, sources


def _overlay(
    base: dict[str, Any],
    top: Mapping[str, Any],
    sources: dict[str, str],
    origin: str,
    prefix: str = "",
) -> None:
    for key, value in top.items():
        if value is None:
            continue  # an option not given on the command line
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _overlay(base[key], value, sources, origin, f"{path}.")
        else:
            base[key] = copy.deepcopy(value)
            _record(sources, {key: value}, origin, prefix)


def _record(sources: dict[str, str], doc: Mapping[str, Any], origin: str, prefix: str = "") -> None:
    for key, value in doc.items():
        path = f"{prefix}{key}"
        sources[path] = origin
        if isinstance(value, Mapping):
            _record(sources, value, origin, f"{path}.")


def load_settings(
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read, merge and validate; raise ConfigError listing every structural problem."""
    doc, path, sources = load_document(config, overrides, environ)
    problems = validate(doc, sources)
    if problems:
        raise ConfigError(problems)
    return settings_from_document(doc, path, sources)


# -- validation ---------------------------------------------------------------------------------
Check = Callable[[Any], str | None]  # a message when the value is wrong


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _nonempty_string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _number(minimum: float, strict: bool = True) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if (value <= minimum) if strict else (value < minimum):
            return f"must be {'greater than' if strict else 'at least'} {minimum:g}"
        return None

    return check


def _port(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be an integer port number"
    return None if 0 <= value <= 65535 else "must be a port number from 0 to 65535"


def _address(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string like 6000@host"
    from .address import parse_addresses

    try:
        parse_addresses(value)
    except ScreenPopError as exc:
        return f"{exc.code.value}: {exc.message}"
    return None


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else "must be one of " + ", ".join(map(repr, choices))

    return check


def _nats_servers(value: Any) -> str | None:
    """`nats://host:4222,nats://other:4222`: every item a nats://, tls:// (or ws) URL."""
    if not isinstance(value, str) or not value.strip():
        return "must be a string like nats://127.0.0.1:4222 (comma-separated for a cluster)"
    for item in value.split(","):
        item = item.strip()
        scheme, sep, rest = item.partition("://")
        if not sep or scheme not in ("nats", "tls", "ws", "wss") or not rest:
            return f"{item!r} is not a nats://HOST:PORT URL"
    return None


def _replicas(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
        return "must be an integer from 1 to 5 (JetStream's limit)"
    return None


def _nats_name(value: Any) -> str | None:
    import re

    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        return "must be 1 to 64 letters, digits, - or _"
    return None


def _existing_file(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a file path"
    return None if Path(value).expanduser().is_file() else "file not found"


def _http_port(value: Any) -> str | None:
    return None if value == -1 and not isinstance(value, bool) else _port(value)


def _count(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return "must be a positive integer"
    return None


MIN_FRAME = 1024  # a pop with every field empty is a frame of about 300 bytes; a welcome ~200


def _frame_size(value: Any) -> str | None:
    """Below MIN_FRAME the hub could send no welcome and take no pop: refused at the check."""
    problem = _count(value)
    if problem is None and value < MIN_FRAME:
        return f"must be at least {MIN_FRAME} (a pop with empty fields is a frame of ~300 bytes)"
    return problem


def _dirs(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        return "must be a list of folder paths"
    return None


def _origins(value: Any) -> str | None:
    """Browser origins as a browser sends them: scheme://host[:port], no path, no slash."""
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        return 'must be a list of origins like "https://crm.example.com"'
    for origin in value:
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest or origin == "*":
            return f'{origin!r} is not an origin like "https://crm.example.com" (no path, no *)'
    return None


def _buttons(value: Any) -> str | None:
    """Panel buttons: [{label, url}], the url a `{field}` template the panel fills in."""
    if not isinstance(value, list):
        return "must be a list of {label, url} tables"
    from .templates import TemplateError, parse_template

    for index, button in enumerate(value):
        if not isinstance(button, dict) or set(button) != {"label", "url"}:
            return f"button {index}: must be a table with exactly label and url"
        if not all(isinstance(v, str) and v for v in button.values()):
            return f"button {index}: label and url must be non-empty strings"
        if not button["url"].startswith(("https://", "http://")):
            return f"button {index}: url must start with https:// or http://"
        try:
            parse_template(button["url"])
        except TemplateError as exc:
            return f"button {index}: {exc}"
    return None


SCHEMA: dict[str, dict[str, Check]] = {
    "server": {
        "address": _address,
        "reconnecting_interval": _number(0),
        "token": _nonempty_string,
        "tls": _bool,
        "cafile": _existing_file,
        "spread": _bool,
    },
    "plugins": {"dirs": _dirs},
    "diagnostics": {"dir": _nonempty_string},
    "hub": {  # the names are HubConfig's (`spop serve`); a test keeps the two in step
        "host": _nonempty_string,
        "port": _port,
        "http_port": _http_port,
        "token": _nonempty_string,
        "source_token": _nonempty_string,
        "journal": _string,
        "pop_ttl": _number(0),
        "dedupe_window": _number(0, strict=False),
        "tls_cert": _existing_file,
        "tls_key": _existing_file,
        "heartbeat": _number(0),
        "handshake_timeout": _number(0),
        "max_frame": _frame_size,
        "max_buffer": _count,
        "max_inflight": _count,
        "max_connections": _count,
        "max_registrations": _count,
        "max_body": _count,
        "http_idle_timeout": _number(0),
        "http_body_timeout": _number(0),
        "contact_forget_after": _number(0, strict=False),
        "contact_idle_expiry": _number(0, strict=False),
        "diag_dir": _nonempty_string,
        "browser_origins": _origins,
        "browser_session_ttl": _number(0),
        "panel_buttons": _buttons,
        "backend": _one_of("embedded", "nats"),
        "nats_servers": _nats_servers,
        "nats_token": _nonempty_string,
        "nats_creds": _existing_file,
        "nats_tls_ca": _existing_file,
        "nats_tls_cert": _existing_file,
        "nats_tls_key": _existing_file,
        "nats_replicas": _replicas,
        "nats_stream": _nats_name,
        "nats_kv_bucket": _nats_name,
        "nats_timeout": _number(0),
    },
}
LISTENER_KEYS = ("media", "resource", "actions")
HUB_FIELDS = tuple(f for f in HubSettings.__dataclass_fields__ if f != "options")
SECTIONS = (*SCHEMA, "listeners", "actions", "sources")


def validate(doc: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> list[Problem]:
    """Structural problems: unknown sections and keys, wrong types, bad values. No plugins needed."""
    sources = sources or {}
    problems: list[Problem] = []

    def problem(path: str, message: str, value: Any = _MISSING) -> None:
        origin = sources.get(path, "")
        shown = origin if origin in ENVIRONMENT or origin == "command line" else ""
        problems.append(Problem(path, message, value, shown))

    for section in doc:
        if section not in SECTIONS:
            problem(section, f"unknown section (expected one of {', '.join(SECTIONS)})")
    for section, checks in SCHEMA.items():
        table = doc.get(section, {})
        if not isinstance(table, dict):
            problem(section, "must be a table")
            continue
        for key, value in table.items():
            check = checks.get(key)
            if check is None:
                problem(
                    f"{section}.{key}", f"unknown key (expected one of {', '.join(checks)})", value
                )
            elif (message := check(value)) is not None:
                problem(f"{section}.{key}", message, value)
    plugins_dirs = (
        doc.get("plugins", {}).get("dirs", []) if isinstance(doc.get("plugins"), dict) else []
    )
    if isinstance(plugins_dirs, list):
        for index, directory in enumerate(plugins_dirs):
            if isinstance(directory, str) and not Path(directory).expanduser().is_dir():
                problem(f"plugins.dirs[{index}]", "folder not found", directory)
    hub = doc.get("hub") if isinstance(doc.get("hub"), dict) else {}
    if bool(hub.get("tls_cert")) != bool(hub.get("tls_key")):
        problem("hub.tls_cert", "tls_cert and tls_key go together: set both or neither")
    if bool(hub.get("nats_tls_cert")) != bool(hub.get("nats_tls_key")):
        problem(
            "hub.nats_tls_cert", "nats_tls_cert and nats_tls_key go together: set both or neither"
        )
    _validate_listeners(doc.get("listeners", []), problem)
    actions = doc.get("actions", {})
    if not isinstance(actions, dict):
        problem("actions", "must be a table of [actions.NAME] tables")
    else:
        for name, table in actions.items():
            if not isinstance(table, dict):
                problem(f"actions.{name}", "must be a table", table)
            elif "plugin" in table and not isinstance(table["plugin"], str):
                problem(f"actions.{name}.plugin", "must be a string", table["plugin"])
    _validate_sources(doc.get("sources", {}), problem)
    return problems


def _validate_sources(sources: Any, problem: Callable[..., None]) -> None:
    """The framework's keys of `[sources.NAME]`; the source's own keys are its factory's to check."""
    if not isinstance(sources, dict):
        problem("sources", "must be a table of [sources.NAME] tables")
        return
    for name, table in sources.items():
        if not isinstance(table, dict):
            problem(f"sources.{name}", "must be a table", table)
            continue
        if "type" in table and (not isinstance(table["type"], str) or not table["type"]):
            problem(f"sources.{name}.type", "must be a source type name", table["type"])
        if "enabled" in table and (message := _bool(table["enabled"])) is not None:
            problem(f"sources.{name}.enabled", message, table["enabled"])
        if "listen" in table:
            from .sources.standalone import parse_listen

            try:
                parse_listen(table["listen"]) if isinstance(table["listen"], str) else parse_listen(
                    ""
                )
            except ValueError as exc:
                problem(f"sources.{name}.listen", str(exc), table["listen"])


def review_sources(doc: Mapping[str, Any], types: Mapping[str, Any]) -> list[Problem]:
    """Each `[sources.NAME]` built by its type's factory; a SourceError names the key at fault."""
    from .sources import SourceError, configured_sources, make_source

    problems = []
    for name, table in configured_sources(doc).items():
        try:
            make_source(types, name, table)
        except SourceError as exc:
            key = f"sources.{name}.{exc.key}" if exc.key else f"sources.{name}"
            value = _lookup(table, exc.key) if exc.key else _MISSING
            problems.append(Problem(key, exc.message, value))
        except Exception as exc:  # a third-party factory's own error
            problems.append(Problem(f"sources.{name}", f"{type(exc).__name__}: {exc}"))
    return problems


def _validate_listeners(listeners: Any, problem: Callable[..., None]) -> None:
    if not isinstance(listeners, list):
        problem("listeners", "must be an array of [[listeners]] tables")
        return
    for index, entry in enumerate(listeners):
        where = f"listeners[{index}]"
        if not isinstance(entry, dict):
            problem(where, "must be a table")
            continue
        for key, value in entry.items():
            if key not in LISTENER_KEYS:
                problem(
                    f"{where}.{key}",
                    f"unknown key (expected one of {', '.join(LISTENER_KEYS)})",
                    value,
                )
        media = entry.get("media", _MISSING)
        if media is _MISSING:
            problem(f"{where}.media", "missing")
        elif not isinstance(media, str) or media not in {m.value for m in Media}:
            problem(
                f"{where}.media",
                f"unknown media (expected {', '.join(m.value for m in Media)})",
                media,
            )
        resource = entry.get("resource", _MISSING)
        if resource is _MISSING:
            problem(f"{where}.resource", "missing (the extension or user ID to watch)")
        else:
            try:
                validate_resource(resource)
            except ScreenPopError as exc:
                problem(f"{where}.resource", exc.message, resource)
        actions = entry.get("actions", [])
        if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
            problem(f"{where}.actions", "must be a list of action names", actions)


def check_config(
    doc: Mapping[str, Any],
    types: Mapping[str, Any] | None = None,
    sources: Mapping[str, str] | None = None,
) -> list[Problem]:
    """Every problem: structural ones, then each action built from its table (when `types` is given)
    and each listener's action names resolved."""
    return review_config(doc, types, sources)[0]


def review_config(
    doc: Mapping[str, Any],
    types: Mapping[str, Any] | None = None,
    sources: Mapping[str, str] | None = None,
) -> tuple[list[Problem], list[Problem]]:
    """(problems, warnings): `check_config`'s problems, and what the built actions call risky but
    valid (their `warnings`), which stops nothing."""
    problems = validate(doc, sources)
    warnings: list[Problem] = []
    if types is None:
        return problems, warnings
    from .actions import ActionConfigError, configure_action
    from .templates import TemplateError, parse_condition

    actions = doc.get("actions", {}) if isinstance(doc.get("actions"), dict) else {}
    for name, table in actions.items():
        if not isinstance(table, dict):
            continue
        if "when" in table:  # checked apart, so a bad filter does not hide the type's own problems
            try:
                parse_condition(table["when"])
            except TemplateError as exc:
                problems.append(Problem(f"actions.{name}.when", str(exc), table["when"]))
            table = {k: v for k, v in table.items() if k != "when"}
        try:
            configured = configure_action(types, name, table)
        except ActionConfigError as exc:
            value = table.get("plugin", name) if exc.key == "plugin" else _lookup(table, exc.key)
            problems.append(Problem(f"actions.{name}.{exc.key}", exc.message, value))
        except Exception as exc:  # a third-party factory's own error
            problems.append(Problem(f"actions.{name}", f"{type(exc).__name__}: {exc}"))
        else:
            for key, message in getattr(configured.action, "warnings", None) or ():
                warnings.append(Problem(f"actions.{name}.{key}", message, _lookup(table, key)))
            check = getattr(configured.action, "problems", None)
            for key, message in check() if callable(check) else ():
                problems.append(Problem(f"actions.{name}.{key}", message, _lookup(table, key)))
    listeners = doc.get("listeners", [])
    if isinstance(listeners, list):
        for index, entry in enumerate(listeners):
            names = entry.get("actions", []) if isinstance(entry, dict) else []
            for position, action in enumerate(names if isinstance(names, list) else []):
                if isinstance(action, str) and action not in actions and action not in types:
                    known = ", ".join(sorted({*actions, *types}))
                    problems.append(
                        Problem(
                            f"listeners[{index}].actions[{position}]",
                            f"unknown action (define [actions.{action}] or use one of: {known})",
                            action,
                        )
                    )
    return problems, warnings


def _lookup(table: Mapping[str, Any], key: str) -> Any:
    """The value at `argv[0]` or `env.CRM` in an action table, or _MISSING."""
    value: Any = table
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        try:
            value = value[int(part[1:-1])] if part.startswith("[") else value[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return _MISSING
    return value


# -- writing --------------------------------------------------------------------------------------
STARTER_HEADER = """\
# spop configuration. Every key is described in config.example.toml and docs/configuration.md.
# Precedence: command-line options > environment (SPOP_SERVER, SPOP_TOKEN, SPOP_DIAG_DIR,
# SPOP_CONFIG) > this file > defaults. Check it with `spop config check`.

"""
STARTER_FOOTER = """
# More actions to add to a listener's `actions` list:
#
# [actions.crm]
# plugin = "url"
# url = "https://crm.example.com/search?phone={source}&queue={queue_name}"
# when = { queue_name = "Ventes*" }
#
# [actions.hook]
# plugin = "command"
# # Each {template} fills one argument, but a value starting with "-" would still be read as
# # an option by many programs: the literal "--" ends the options before the caller's values.
# argv = ["/usr/local/bin/on-pop", "--", "{source}", "{contact_data[code1]}"]
# timeout = 10
#
# [actions.log]
# plugin = "json"
# path = "/var/log/spop/pops.ndjson"
"""


def starter_document() -> dict[str, Any]:
    return {
        "server": {"address": DEFAULT_ADDRESS, "reconnecting_interval": 30},
        "plugins": {"dirs": []},
        "listeners": [{"media": "telephone", "resource": "13579", "actions": ["screen"]}],
        "actions": {"screen": {"plugin": "print"}},
    }


def init_config(path: str | Path, force: bool = False) -> Path:
    """Write a valid starting file; refuse to replace one unless `force`."""
    import tomli_w

    target = Path(path).expanduser()
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists (use --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        STARTER_HEADER + tomli_w.dumps(starter_document()) + STARTER_FOOTER, encoding="utf-8"
    )
    return target


def show_config(doc: Mapping[str, Any], secrets: bool = False) -> str:
    """The merged settings as TOML; tokens hidden unless `secrets`."""
    import tomli_w

    shown = copy.deepcopy(dict(doc))
    if not secrets:
        sources = shown.get("sources")
        tables = [shown.get("server"), shown.get("hub")]
        tables += list(sources.values()) if isinstance(sources, dict) else []
        for table in tables:
            if isinstance(table, dict):
                for key in table:
                    if any(word in key.lower() for word in SECRET_WORDS):
                        table[key] = "********"
        hub = shown.get("hub")
        if isinstance(hub, dict) and isinstance(hub.get("nats_servers"), str):
            hub["nats_servers"] = hide_url_passwords(hub["nats_servers"])
    return tomli_w.dumps(shown)


def hide_url_passwords(urls: str) -> str:
    """`nats://user:pass@host` → `nats://user:********@host` and `nats://TOKEN@host` →
    `nats://********@host` (a NATS token in the URL), for each URL of a list."""

    def hide(match: re.Match[str]) -> str:
        user, colon, _ = match.group(2).partition(":")
        return f"{match.group(1)}{user + ':' if colon else ''}********@"

    return re.sub(r"(//)([^/@,\s]+)@", hide, urls)
