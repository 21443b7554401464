"""Every command the docs show runs as written (issue 17, Broken 5).

The shell commands are taken from README.md and docs/*.md (```sh, ```cron and ```ini blocks, and
`$ spop …` lines anywhere). Each `spop` command is parsed by the real click CLI, so an unknown
option, a bad choice or a missing argument fails; `--action NAME` must be an action that exists.
Those that can run here do, against a real hub on a free loopback port: `PORT@HOST` in the
command becomes that hub's address (and `$SPOP_SERVER` names it when the command gives none), as
`localhost:6080` becomes its HTTP port for `curl`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from spop_cli.cli import cli
from spop_cli.model import MEDIA_FIELDS, Media

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SEPARATORS = {"&&", "||", "|", ";"}


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.argv)}"


def _segments(line: str) -> list[list[str]]:
    """The simple commands of one shell line: split at && || | ;, without redirections or
    leading VAR=value assignments."""
    tokens = shlex.split(line, comments=True)
    segments: list[list[str]] = [[]]
    skip = False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token in SEPARATORS:
            segments.append([])
        elif re.match(r"^\d*(>>?|<)(&\d)?$", token):  # `>` FILE, `2>&1`
            skip = not token.endswith(("&1", "&2"))
        elif re.match(r"^\d*(>>?|<)", token):  # `>>"$HOME/log"`
            continue
        else:
            segments[-1].append(token)
    cleaned = []
    for segment in segments:
        while segment and re.match(r"^[A-Z_][A-Z0-9_]*=", segment[0]):
            segment = segment[1:]
        if segment:
            cleaned.append(segment)
    return cleaned


def shell_commands() -> list[Command]:
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        language = None
        number = 0
        while number < len(lines):
            line = lines[number]
            start = number + 1
            if line.startswith("```"):
                language = None if language is not None else (line[3:].strip() or "text")
                number += 1
                continue
            while line.endswith("\\") and number + 1 < len(lines):  # continuation lines
                number += 1
                line = line[:-1] + " " + lines[number].strip()
            number += 1
            text = None
            if language == "sh":
                text = line.removeprefix("$ ")
            elif language == "cron" and line and not line.startswith("#"):
                text = " ".join(line.split()[5:])
            elif language == "ini" and line.startswith("ExecStart="):
                text = line.removeprefix("ExecStart=")
            elif language is not None and line.startswith("$ spop "):
                text = line[2:]
            if text:
                for argv in _segments(text.replace("%h", "/home/agent")):
                    found.append(Command(f"{path.relative_to(ROOT)}:{start}", tuple(argv)))
    return found


COMMANDS = shell_commands()
SPOP = [c for c in COMMANDS if Path(c.argv[0]).name == "spop"]
CURL = [c for c in COMMANDS if c.argv[0] == "curl"]


def test_the_docs_have_commands_to_check() -> None:
    wheres = {c.where.split(":")[0] for c in SPOP}
    assert {"README.md", "docs/cli.md", "docs/operations.md"} <= wheres
    assert len(SPOP) >= 20
    assert len(CURL) >= 3


def parse(args: list[str]) -> click.Context:
    """Parse like `spop ARGS` would, down to the last subcommand; raise click's error if any."""
    ctx = cli.make_context("spop", list(args))
    command: click.Command = cli
    while isinstance(command, click.Group):
        protected = getattr(ctx, "_protected_args", None)  # click 8.2 names it so
        rest = [*(ctx.protected_args if protected is None else protected), *ctx.args]
        if not rest:
            break
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None, f"unknown command {name}"
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub
    return ctx


def _missing_file_only(error: click.BadParameter) -> bool:
    """`--tls-cert /etc/spop/hub.pem`: a file of the machine the docs speak of, not of this one."""
    return isinstance(error.param.type if error.param else None, click.Path) and (
        "does not exist" in error.format_message()
    )


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch) -> None:
    for name in ("SPOP_CONFIG", "SPOP_SERVER", "SPOP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPOP_DIAG_DIR", str(tmp_path / "diag"))
    monkeypatch.setattr("spop_cli.config.default_config_path", lambda: tmp_path / "none.toml")
    monkeypatch.chdir(ROOT)  # `--plugins-dir plugins` is the repository's


@pytest.mark.parametrize("command", SPOP, ids=str)
def test_each_spop_command_parses_and_its_actions_exist(command: Command) -> None:
    try:
        ctx = parse(list(command.argv[1:]))
    except click.BadParameter as error:
        if _missing_file_only(error):
            return
        raise AssertionError(f"{command}: {error.format_message()}") from None
    except click.UsageError as error:
        raise AssertionError(f"{command}: {error.format_message()}") from None
    params = ctx.params
    if ctx.command.name == "listen" and not params.get("config_path"):
        from spop_cli.actions import configure_action
        from spop_cli.plugins import action_types, get_plugin_manager

        types = action_types(get_plugin_manager(list(params.get("plugin_dirs") or ())))
        for name in params.get("action_names") or ():
            configure_action(types, name, {})  # an unknown action raises, naming it


# What runs here for real, against the test's hub: everything that ends by itself and needs no
# file of another machine.
RUNNABLE = {"send", "simulate", "status", "plugins", "diag", "config show", "listen"}


def _runnable(command: Command) -> bool:
    words = command.argv[1:3]
    if not words:
        return False
    name = words[0] if words[0] != "config" else " ".join(words)
    if name not in RUNNABLE:
        return False
    if name == "diag" and "-f" in command.argv:
        return False  # follows forever
    if name == "listen":  # one that waits for a pop, or reads a file of the agent's machine
        return not {"--once", "--count", "--config"} & set(command.argv)
    return True


@pytest.fixture
def hub_for_docs():
    from conftest import HubThread

    hub = HubThread()
    yield hub
    hub.close()


@pytest.mark.parametrize("command", [c for c in SPOP if _runnable(c)], ids=str)
def test_each_runnable_spop_command_succeeds_against_a_real_hub(
    command: Command, hub_for_docs, monkeypatch
) -> None:
    address = hub_for_docs.address
    args = [re.sub(r"^\d+@[\w.-]+$", address, arg) for arg in command.argv[1:]]
    monkeypatch.setenv("SPOP_SERVER", address)  # the default hub, for a command that names none
    if args[0] == "listen":
        args += ["--timeout", "0.3"]  # listen a moment, then exit 0
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, f"{command}\n{result.output}"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("command", CURL, ids=str)
def test_each_curl_command_succeeds_against_a_real_hub(command: Command, hub_for_docs) -> None:
    http = f"127.0.0.1:{hub_for_docs.options['http_port']}"
    args = [re.sub(r"\blocalhost:6080\b", http, arg) for arg in command.argv]
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{command}\n{result.stderr}"
    json.loads(result.stdout)  # the hub's JSON answer


def test_the_fields_by_media_table_is_the_models() -> None:
    text = (ROOT / "docs" / "python-api.md").read_text(encoding="utf-8")
    for media, fields in MEDIA_FIELDS.items():
        row = next(
            line for line in text.splitlines() if line.startswith(f"| `{Media(media).value}` |")
        )
        listed = re.findall(r"`(\w+)`", row.split("|")[3])
        assert listed == [("from_" if f == "from" else f) for f in fields], row


def help_examples() -> list[Command]:
    from spop_cli.cli import EXAMPLES

    return [
        Command(f"--help of spop {name}", tuple(shlex.split(line.strip())))
        for name, text in EXAMPLES.items()
        for line in text.splitlines()
        if line.strip().startswith("spop ")
    ]


@pytest.mark.parametrize("command", help_examples(), ids=str)
def test_each_help_example_parses(command: Command) -> None:
    test_each_spop_command_parses_and_its_actions_exist(command)


def test_the_python_source_example_prints_what_its_comment_says(hub_for_docs) -> None:
    """python-api.md, "Sending pops and contact events": the example, run against a real hub."""
    import contextlib
    import io

    text = (ROOT / "docs" / "python-api.md").read_text(encoding="utf-8")
    section = text.split("## Sending pops and contact events", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    said = code.split("print(ids, answer)   # ", 1)[1].split("\n", 1)[0]
    assert said == "['call-42'] {'applied': 1, 'pops': ['e-1']}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("6000@localhost", hub_for_docs.address), {"__name__": "example"})
    assert out.getvalue() == said + "\n"
