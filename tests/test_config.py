"""Settings: one merge (command line > environment > file > defaults), problems that name key and value."""

from __future__ import annotations

import dataclasses
import json
import textwrap
import tomllib
from pathlib import Path

import pytest

from spop_cli.config import (
    ConfigError,
    check_config,
    init_config,
    load_document,
    load_settings,
    show_config,
    validate,
)
from spop_cli.plugins import action_types, build_plugin_manager

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_user_config(tmp_path: Path, monkeypatch) -> Path:
    """Never read the real user's config file."""
    path = tmp_path / "user-config" / "config.toml"
    monkeypatch.setattr("spop_cli.config.default_config_path", lambda: path)
    return path


def write(tmp_path: Path, text: str, name: str = "spop.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def builtin_types() -> dict:
    return action_types(build_plugin_manager(entry_points=False))


ISSUE_EXAMPLE = """\
[server]
address = "6000@localhost"
reconnecting_interval = 30

[plugins]
dirs = ["plugins"]

[[listeners]]
media = "telephone"
resource = "13579"
actions = ["screen", "crm", "hook", "log"]

[actions.screen]
plugin = "print"

[actions.crm]
plugin = "url"
url = "https://crm.example.com/search?phone={source}&queue={queue_name}"
when = { queue_name = "Ventes*" }

[actions.hook]
plugin = "command"
argv = ["./on-pop.sh", "{source}", "{contact_data[code1]}"]
env = { CRM = "prod" }
timeout = 10

[actions.log]
plugin = "json"
path = "pops.ndjson"
"""


def test_defaults_without_any_file() -> None:
    settings = load_settings(environ={})
    assert settings.config_path is None
    assert settings.server.address == "6000@localhost"
    assert settings.server.reconnecting_interval == 30.0
    assert settings.server.token is None
    assert settings.server.ssl_context() is None
    assert settings.listeners == [] and settings.actions == {} and settings.plugin_dirs == []
    assert (
        settings.hub.port == 6000 and settings.hub.http_port == 6080 and settings.hub.pop_ttl == 120
    )
    assert settings.sources["server.address"] == "default"


def test_the_issue_example_reads_and_checks_clean(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "on-pop.sh").write_text("#!/bin/sh\n")
    (tmp_path / "on-pop.sh").chmod(0o755)
    path = write(tmp_path, ISSUE_EXAMPLE)
    settings = load_settings(path, environ={})
    assert settings.config_path == path
    (listener,) = settings.listeners
    assert (listener.media, listener.resource, listener.actions) == (
        "telephone",
        "13579",
        ["screen", "crm", "hook", "log"],
    )
    assert settings.plugin_dirs == [tmp_path / "plugins"]  # relative to the file
    assert settings.actions["crm"]["when"] == {"queue_name": "Ventes*"}
    assert check_config(settings.document, builtin_types(), settings.sources) == []


def test_precedence_command_line_over_environment_over_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        [server]
        address = "6000@file-host"
        token = "file-token"
        reconnecting_interval = 12
        """,
    )
    environ = {"SPOP_SERVER": "6001@env-host", "SPOP_TOKEN": "env-token"}
    settings = load_settings(path, environ=environ)
    assert settings.server.address == "6001@env-host"
    assert settings.server.token == "env-token"
    assert settings.hub.token == "env-token"  # one shared secret for hub and desktops
    assert settings.server.reconnecting_interval == 12
    assert settings.sources["server.address"] == "SPOP_SERVER"
    assert settings.sources["server.reconnecting_interval"] == str(path)
    overrides = {"server": {"address": "6002@cli-host", "token": None, "reconnecting_interval": 3}}
    settings = load_settings(path, overrides, environ=environ)
    assert settings.server.address == "6002@cli-host"
    assert settings.server.token == "env-token"  # an option not given does not erase
    assert settings.server.reconnecting_interval == 3
    assert settings.sources["server.address"] == "command line"


def test_spop_config_names_the_file_and_config_beats_it(tmp_path: Path) -> None:
    env_file = write(tmp_path, '[server]\naddress = "1@env-file"\n', "env.toml")
    cli_file = write(tmp_path, '[server]\naddress = "2@cli-file"\n', "cli.toml")
    environ = {"SPOP_CONFIG": str(env_file)}
    assert load_settings(environ=environ).server.address == "1@env-file"
    assert load_settings(cli_file, environ=environ).server.address == "2@cli-file"


def test_the_user_config_file_is_read_when_present(no_user_config: Path) -> None:
    no_user_config.parent.mkdir(parents=True)
    no_user_config.write_text('[server]\naddress = "7000@desk"\n')
    settings = load_settings(environ={})
    assert settings.config_path == no_user_config
    assert settings.server.address == "7000@desk"


def test_a_named_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(environ={"SPOP_CONFIG": str(tmp_path / "nope.toml")})


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\naddress = "x\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(path) in str(caught.value) and "line 2" in str(caught.value)


def test_plugin_dirs_from_the_command_line_add_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path = write(tmp_path, '[plugins]\ndirs = ["a"]\n')
    settings = load_settings(path, {"plugins": {"dirs": [str(tmp_path / "b")]}}, environ={})
    assert settings.plugin_dirs == [tmp_path / "a", tmp_path / "b"]


def test_diag_dir_from_the_environment_or_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[diagnostics]\ndir = "/var/log/spop"\n')
    assert load_settings(path, environ={}).diag_dir == Path("/var/log/spop")
    assert load_settings(path, environ={"SPOP_DIAG_DIR": "/tmp/d"}).diag_dir == Path("/tmp/d")


# Each row: a file, and the exact problem it must produce.
PROBLEMS = [
    (
        '[[listeners]]\nmedia = "fax"\nresource = "1"\n',
        'listeners[0].media = "fax": unknown media (expected telephone, callback, email, webcollab)',
    ),
    (
        '[[listeners]]\nmedia = "email"\nresource = "a"\n[[listeners]]\nmedia = "fax"\nresource = "1"\n',
        'listeners[1].media = "fax": unknown media (expected telephone, callback, email, webcollab)',
    ),
    ('[[listeners]]\nresource = "1"\n', "listeners[0].media: missing"),
    (
        '[[listeners]]\nmedia = "email"\n',
        "listeners[0].resource: missing (the extension or user ID to watch)",
    ),
    (
        '[[listeners]]\nmedia = "email"\nresource = "  "\n',
        'listeners[0].resource = "  ": resource is empty',
    ),
    (
        '[[listeners]]\nmedia = "email"\nresource = "a"\nactions = "screen"\n',
        'listeners[0].actions = "screen": must be a list of action names',
    ),
    (
        '[[listeners]]\nmedia = "email"\nresource = "a"\nextension = "1"\n',
        'listeners[0].extension = "1": unknown key (expected one of media, resource, actions)',
    ),
    (
        '[server]\naddress = "6000@"\n',
        "server.address = \"6000@\": SCREENPOP_Initialization_Error: no host in address '6000@'",
    ),
    (
        "[server]\nreconnecting_interval = 0\n",
        "server.reconnecting_interval = 0: must be greater than 0",
    ),
    (
        '[server]\nreconnecting_interval = "30"\n',
        'server.reconnecting_interval = "30": must be a number',
    ),
    (
        '[server]\nadress = "x"\n',
        'server.adress = "x": unknown key (expected one of address, reconnecting_interval, token, tls, cafile, spread)',
    ),
    ('[server]\ntoken = ""\n', 'server.token = "": must be a non-empty string'),
    ('[server]\ncafile = "/no/such/ca.pem"\n', 'server.cafile = "/no/such/ca.pem": file not found'),
    ('[plugins]\ndirs = "plugins"\n', 'plugins.dirs = "plugins": must be a list of folder paths'),
    ("[hub]\nport = 70000\n", "hub.port = 70000: must be a port number from 0 to 65535"),
    ("[hub]\nport = true\n", "hub.port = true: must be an integer port number"),
    ("[hub]\npop_ttl = -5\n", "hub.pop_ttl = -5: must be greater than 0"),
    ("[hub]\ndedupe_window = -1\n", "hub.dedupe_window = -1: must be at least 0"),
    ("[hub]\nmax_body = 0\n", "hub.max_body = 0: must be a positive integer"),
    (
        "[hub]\nmax_frame = 1023\n",
        "hub.max_frame = 1023: must be at least 1024 (a pop with empty fields is a frame of ~300 bytes)",
    ),
    ('[hub]\nhost = "0.0.0.0"\nbind = "x"\n', 'hub.bind = "x": unknown key'),
    ("[hubb]\nport = 1\n", "hubb: unknown section"),
    ('listeners = "x"\n', "listeners: must be an array of [[listeners]] tables"),
    ('[actions]\nscreen = "print"\n', 'actions.screen = "print": must be a table'),
]


@pytest.mark.parametrize(("text", "expected"), PROBLEMS)
def test_problems_name_the_key_and_value(tmp_path: Path, text: str, expected: str) -> None:
    doc, _, sources = load_document(write(tmp_path, text), environ={})
    messages = [str(problem) for problem in validate(doc, sources)]
    assert any(message.startswith(expected) for message in messages), messages


def test_a_max_frame_of_1024_is_accepted(tmp_path: Path) -> None:
    """The other side of the 1023 row above: the smallest frame limit that still works."""
    doc, _, sources = load_document(write(tmp_path, "[hub]\nmax_frame = 1024\n"), environ={})
    assert validate(doc, sources) == []


def test_a_bad_value_from_the_environment_says_so(tmp_path: Path) -> None:
    doc, _, sources = load_document(environ={"SPOP_SERVER": "nonsense@"})
    (problem,) = validate(doc, sources)
    assert str(problem).startswith('server.address = "nonsense@" (from SPOP_SERVER): ')


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    cert = write(tmp_path, "x", "cert.pem")
    doc, _, _ = load_document(write(tmp_path, f'[hub]\ntls_cert = "{cert}"\n'), environ={})
    assert [str(p) for p in validate(doc)] == [
        "hub.tls_cert: tls_cert and tls_key go together: set both or neither"
    ]


def test_load_settings_reports_every_problem_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nreconnecting_interval = 0\n[[listeners]]\nmedia = "fax"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert len(caught.value.problems) == 3


CHECKS = [
    (
        '[actions.crm]\nplugin = "urll"\n',
        'actions.crm.plugin = "urll": unknown action plugin (known: command, json, print, url)',
    ),
    (
        '[actions.crm]\nplugin = "url"\nurl = "https://crm/?q={sourc}"\n',
        'actions.crm.url = "https://crm/?q={sourc}": unknown field {sourc}',
    ),
    ('[actions.crm]\nplugin = "url"\n', "actions.crm.url: is required"),
    (
        '[actions.crm]\nplugin = "print"\nwhen = { queue = "V*" }\n',
        "actions.crm.when = {\"queue\": \"V*\"}: unknown field 'queue' in 'when'",
    ),
    (
        '[actions.hook]\nplugin = "command"\nargv = ["{source}"]\n',
        'actions.hook.argv[0] = "{source}": the program must be literal',
    ),
    (
        '[actions.hook]\nplugin = "command"\nargv = ["x"]\nenv = { A = 1 }\n',
        "actions.hook.env.A = 1: must be a string",
    ),
    (
        '[actions.log]\nplugin = "json"\npath = "x"\nrotate = true\n',
        "actions.log.rotate = true: unknown key",
    ),
    (
        '[[listeners]]\nmedia = "email"\nresource = "a"\nactions = ["print", "hok"]\n',
        'listeners[0].actions[1] = "hok": unknown action (define [actions.hok] or use one of: command, json, print, url)',
    ),
]


@pytest.mark.parametrize(("text", "expected"), CHECKS)
def test_check_builds_every_action(tmp_path: Path, text: str, expected: str) -> None:
    doc, _, sources = load_document(write(tmp_path, text), environ={})
    messages = [str(p) for p in check_config(doc, builtin_types(), sources)]
    assert any(message.startswith(expected) for message in messages), messages


def test_a_bad_when_does_not_hide_the_types_own_problem(tmp_path: Path) -> None:
    text = '[actions.crm]\nplugin = "url"\nurl = "{source}"\nwhen = { queue = "V*" }\n'
    doc, _, _ = load_document(write(tmp_path, text), environ={})
    paths = [p.path for p in check_config(doc, builtin_types())]
    assert paths == ["actions.crm.when", "actions.crm.url"]


def test_init_writes_a_valid_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = init_config(tmp_path / "sub" / "config.toml")
    text = path.read_text()
    assert text.startswith("# spop configuration")
    tomllib.loads(text)
    settings = load_settings(path, environ={})
    assert check_config(settings.document, builtin_types()) == []
    assert settings.listeners[0].actions == ["screen"]
    path.write_text("# mine\n")
    with pytest.raises(FileExistsError, match="--force"):
        init_config(path)
    assert path.read_text() == "# mine\n"
    init_config(path, force=True)
    assert path.read_text().startswith("# spop configuration")


def test_show_is_toml_with_secrets_hidden(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\ntoken = "s3cret"\n[hub]\nsource_token = "pub"\n')
    doc, _, _ = load_document(path, environ={"SPOP_SERVER": "9@h"})
    shown = show_config(doc)
    parsed = tomllib.loads(shown)
    assert parsed["server"] == {"address": "9@h", "reconnecting_interval": 30, "token": "********"}
    assert parsed["hub"]["source_token"] == "********"
    assert "s3cret" not in shown
    assert tomllib.loads(show_config(doc, secrets=True))["server"]["token"] == "s3cret"


def test_show_hides_the_nats_token_and_passwords_in_nats_urls(tmp_path: Path) -> None:
    """An outside check saw `nats_token = "nats-secret"` in clear (only token and source_token
    were hidden), and a password in a nats:// URL."""
    servers = "nats://spop:pa55@n1:4222,nats://t0ken@n2:4222,nats://n3:4222"
    path = write(
        tmp_path,
        f'[hub]\nbackend = "nats"\nnats_token = "nats-secret"\nnats_servers = "{servers}"\n',
    )
    doc, _, _ = load_document(path, environ={})
    shown = show_config(doc)
    hub = tomllib.loads(shown)["hub"]
    assert hub["nats_token"] == "********"
    assert (
        hub["nats_servers"] == "nats://spop:********@n1:4222,nats://********@n2:4222,nats://n3:4222"
    )
    assert "nats-secret" not in shown and "pa55" not in shown and "t0ken" not in shown
    shown = tomllib.loads(show_config(doc, secrets=True))["hub"]
    assert (shown["nats_token"], shown["nats_servers"]) == ("nats-secret", servers)


def test_spop_source_token_sets_the_hubs_source_token_as_serve_takes_it(tmp_path: Path) -> None:
    path = write(tmp_path, '[hub]\nsource_token = "from-file"\n')
    doc, _, sources = load_document(path, environ={"SPOP_SOURCE_TOKEN": "from-env"})
    assert doc["hub"]["source_token"] == "from-env"
    assert sources["hub.source_token"] == "SPOP_SOURCE_TOKEN"


def test_hub_keys_are_hub_config_fields(tmp_path: Path) -> None:
    """`[hub]` is what `spop serve` reads: same names, and HubConfig accepts the merged table."""
    from spop_cli.config import SCHEMA
    from spop_cli.hub.server import HubConfig

    assert set(SCHEMA["hub"]) == {f.name for f in dataclasses.fields(HubConfig)}
    path = write(tmp_path, "[hub]\nport = 0\npop_ttl = 30\ndedupe_window = 0\nheartbeat = 2\n")
    settings = load_settings(path, environ={})
    config = HubConfig(**settings.hub.options)
    assert (config.port, config.pop_ttl, config.dedupe_window, config.heartbeat) == (0, 30, 0, 2)
    assert settings.hub.port == 0


def test_config_example_at_the_root_checks_clean_with_the_example_plugins() -> None:
    path = ROOT / "config.example.toml"
    doc, _, sources = load_document(path, environ={})
    types = action_types(build_plugin_manager([ROOT / "plugins"], entry_points=False))
    assert [str(p) for p in check_config(doc, types, sources)] == []
    documented = tomllib.loads(path.read_text())
    assert set(documented) == {"server", "plugins", "diagnostics", "hub", "listeners", "actions"}


# -- warnings: valid but risky --------------------------------------------------------------------
def warnings_of(doc: dict, types: dict | None = None) -> list[str]:
    from spop_cli.config import review_config

    problems, warnings = review_config(doc, types or builtin_types())
    # These are about warnings; whether the program exists is tested on its own (below).
    assert [p for p in problems if not p.message.startswith("program not found")] == []
    return [str(w) for w in warnings]


@pytest.mark.parametrize(
    ("argv", "warned"),
    [
        (["/usr/bin/sort", "{source}", "in.txt"], ["argv[1]"]),
        (["/usr/bin/sort", "{source}", "--", "{queue_name}"], ["argv[1]"]),
        (["prog", "{source}", "{contact_data[code1]}"], ["argv[1]", "argv[2]"]),
        (["/usr/bin/sort", "--", "{source}", "{contact_data[code1]}"], []),
        (["prog", "--phone={source}", "x{queue_name}"], []),  # a literal start keeps them options
        (["prog", "-v", "in.txt"], []),
    ],
)
def test_a_templated_argument_before_double_dash_is_a_warning(
    argv: list[str], warned: list[str]
) -> None:
    doc = {"actions": {"hook": {"plugin": "command", "argv": argv}}}
    messages = warnings_of(doc)
    assert [m.split(" = ")[0] for m in messages] == [f"actions.hook.{key}" for key in warned]
    for message in messages:
        assert '"--"' in message and "option" in message
    problems = check_config(doc, builtin_types())
    assert [p for p in problems if p.path != "actions.hook.argv[0]"] == []  # a warning is not one


def test_the_starter_and_the_example_put_double_dash_before_templates(tmp_path: Path) -> None:
    from spop_cli.config import STARTER_FOOTER

    # The starter's commented actions, uncommented, are a valid file without warnings.
    lines = [line[2:] for line in STARTER_FOOTER.splitlines() if line.startswith("# ")]
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("[actions.")) :]
    starter = tomllib.loads("\n".join(line for line in lines if not line.startswith("#")))
    assert "--" in starter["actions"]["hook"]["argv"]
    assert warnings_of(starter) == []
    doc, _, _ = load_document(ROOT / "config.example.toml", environ={})
    types = action_types(build_plugin_manager([ROOT / "plugins"], entry_points=False))
    assert warnings_of(doc, types) == []
    assert "--" in doc["actions"]["hook"]["argv"]


# -- command actions: programs relative to the file, and checked before any pop ----------------
def command_file(tmp_path: Path, argv0: str, cwd: str | None = None) -> Path:
    extra = f'cwd = "{cwd}"\n' if cwd else ""
    return write(
        tmp_path,
        f'[actions.hook]\nplugin = "command"\nargv = ["{argv0}", "--", "{{source}}"]\n{extra}',
    )


def test_a_relative_program_is_found_from_the_config_files_folder(
    tmp_path: Path, monkeypatch
) -> None:
    path = command_file(tmp_path, "./hooks/on-pop.sh", cwd="work")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # as a service started from / would be
    settings = load_settings(path, environ={})
    assert settings.actions["hook"]["argv"][0] == str(tmp_path / "hooks" / "on-pop.sh")
    assert settings.actions["hook"]["argv"][1:] == ["--", "{source}"]
    assert settings.actions["hook"]["cwd"] == str(tmp_path / "work")


def test_a_relative_program_given_with_a_relative_config_path_stays_a_path(
    tmp_path: Path, monkeypatch
) -> None:
    """`--config c.toml` run in the file's own folder: `./append.sh` became `append.sh`, looked
    up on PATH ("program not found on PATH", exit 12), where the same file checked from /
    was fine (an outside check)."""
    command_file(tmp_path, "./append.sh")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(Path("spop.toml"), environ={})
    assert settings.actions["hook"]["argv"][0] == str(tmp_path / "append.sh")


@pytest.mark.parametrize("program", ["notify-send-nope", "/usr/bin/sort", "{source}"])
def test_a_bare_name_absolute_path_or_template_is_left_as_written(
    tmp_path: Path, program: str
) -> None:
    settings_doc, _, _ = load_document(command_file(tmp_path, program), environ={})
    assert settings_doc["actions"]["hook"]["argv"][0] == program


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "program not found: {dir}/hooks/on-pop.sh"),
        ("not-executable", "not executable: {dir}/hooks/on-pop.sh (chmod +x it)"),
        ("folder", "not a file: {dir}/hooks/on-pop.sh"),
        ("ok", None),
    ],
)
def test_config_check_says_when_the_program_cannot_run(
    tmp_path: Path, setup: str, message: str | None
) -> None:
    program = tmp_path / "hooks" / "on-pop.sh"
    program.parent.mkdir()
    if setup == "folder":
        program.mkdir()
    elif setup != "missing":
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755 if setup == "ok" else 0o644)
    doc, _, sources = load_document(command_file(tmp_path, "hooks/on-pop.sh"), environ={})
    problems = [str(p) for p in check_config(doc, builtin_types(), sources)]
    if message is None:
        assert problems == []
    else:
        value = json.dumps(str(program))
        assert problems == [f"actions.hook.argv[0] = {value}: {message.format(dir=tmp_path)}"]


def test_a_program_name_not_on_path_is_a_problem(tmp_path: Path) -> None:
    doc, _, sources = load_document(command_file(tmp_path, "spop-no-such-program"), environ={})
    problems = [str(p) for p in check_config(doc, builtin_types(), sources)]
    assert problems == ['actions.hook.argv[0] = "spop-no-such-program": program not found on PATH']


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (["https://crm.example.com", "http://127.0.0.1:8000"], None),
        ([], None),
        ("https://crm.example.com", 'must be a list of origins like "https://crm.example.com"'),
        (["*"], "'*' is not an origin like \"https://crm.example.com\" (no path, no *)"),
        (
            ["https://crm.example.com/"],
            "'https://crm.example.com/' is not an origin like \"https://crm.example.com\" (no path, no *)",
        ),
        (
            ["crm.example.com"],
            "'crm.example.com' is not an origin like \"https://crm.example.com\" (no path, no *)",
        ),
        (
            ["ftp://crm.example.com"],
            "'ftp://crm.example.com' is not an origin like \"https://crm.example.com\" (no path, no *)",
        ),
    ],
)
def test_browser_origins_are_checked(value: object, problem: str | None) -> None:
    from spop_cli.config import SCHEMA

    assert SCHEMA["hub"]["browser_origins"](value) == problem


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (
            [{"label": "CRM", "url": "https://crm.example.com/c?p={source}&r={contact_data[Ref]}"}],
            None,
        ),
        ({"label": "CRM"}, "must be a list of {label, url} tables"),
        ([{"label": "CRM"}], "button 0: must be a table with exactly label and url"),
        ([{"label": "", "url": "https://x"}], "button 0: label and url must be non-empty strings"),
        (
            [{"label": "CRM", "url": "javascript:alert(1)"}],
            "button 0: url must start with https:// or http://",
        ),
        (
            [{"label": "CRM", "url": "https://x/{nope}"}],
            "button 0: unknown field {nope} (use {FIELD} or {contact_data[KEY]}; fields: id, media,"
            " resource, contact_id, created_at, source, destination, queue_name,"
            " contact_description, from, redirect, wait_time, change, pop_id, at, answered_by,"
            " transferred_to, consulted, talk_time, reason)",
        ),
    ],
)
def test_panel_buttons_are_checked(value: object, problem: str | None) -> None:
    from spop_cli.config import SCHEMA

    assert SCHEMA["hub"]["panel_buttons"](value) == problem
