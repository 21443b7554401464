"""`spop config`, `spop plugins`, `spop diag` with CliRunner and real files; `diag tail -f` as a process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from spop_cli.cli import EXIT_CONFIG, cli
from spop_cli.diagnostics import NumberedRotatingHandler

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch) -> Path:
    """No user config file, no SPOP_* leaking in from the caller's shell."""
    path = tmp_path / "user-config" / "config.toml"
    monkeypatch.setattr("spop_cli.config.default_config_path", lambda: path)
    for name in ("SPOP_CONFIG", "SPOP_SERVER", "SPOP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return path


def spop(*args: str, **kwargs) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, **kwargs)


# -- config --------------------------------------------------------------------------------------
def test_config_init_show_check(tmp_path: Path) -> None:
    path = tmp_path / "spop.toml"
    result = spop("config", "init", str(path))
    assert result.exit_code == 0 and result.output.strip() == str(path)
    result = spop("config", "check", "--config", str(path))
    assert result.exit_code == 0, result.output
    assert result.output == f"{path}: ok (1 listener, 1 action)\n"
    result = spop("config", "show", "--config", str(path))
    assert result.exit_code == 0
    assert result.output.startswith(f"# file: {path}\n")
    shown = tomllib.loads(result.output)
    assert shown["listeners"] == [
        {"media": "telephone", "resource": "13579", "actions": ["screen"]}
    ]
    assert shown["hub"]["port"] == 6000  # defaults are merged in


def test_config_init_default_path_and_refusal(isolated: Path) -> None:
    assert spop("config", "init").output.strip() == str(isolated)
    assert isolated.exists()
    result = CliRunner().invoke(cli, ["config", "init"])
    assert result.exit_code == EXIT_CONFIG
    assert "already exists (use --force" in result.output
    assert spop("config", "init", "--force").exit_code == 0


def test_config_show_merges_environment_and_hides_tokens(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "spop.toml"
    path.write_text('[server]\ntoken = "s3cret"\n')
    monkeypatch.setenv("SPOP_SERVER", "6100@pbx")
    result = spop("config", "show", "--config", str(path))
    assert "# environment: SPOP_DIAG_DIR, SPOP_SERVER" in result.output
    shown = tomllib.loads(result.output)
    assert shown["server"]["address"] == "6100@pbx"
    assert shown["server"]["token"] == "********"
    assert "s3cret" in spop("config", "show", "--config", str(path), "--secrets").output


def test_config_check_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[server]\nreconnecting_interval = 0\n"
        '[[listeners]]\nmedia = "fax"\nresource = "1"\nactions = ["crm"]\n'
        '[actions.crm]\nplugin = "url"\nurl = "https://crm/?q={sourc}"\n'
    )
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert result.exit_code == EXIT_CONFIG
    lines = result.stdout.splitlines()
    assert lines[0] == "server.reconnecting_interval = 0: must be greater than 0"
    assert lines[1].startswith('listeners[0].media = "fax": unknown media')
    assert lines[2].startswith('actions.crm.url = "https://crm/?q={sourc}": unknown field {sourc}')
    assert len(lines) == 3
    assert f"3 problems in {path}" in result.stderr


def test_config_check_with_a_broken_plugin(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken.py").write_text("raise RuntimeError('boom')\n")
    path = tmp_path / "spop.toml"
    path.write_text('[plugins]\ndirs = ["plugins"]\n[actions.x]\nplugin = "mine"\n')
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert result.exit_code == EXIT_CONFIG
    assert (
        f"plugins: plugin file {plugins / 'broken.py'} failed to import: line 1: RuntimeError: boom"
        in result.stdout
    )


def test_config_check_of_the_example() -> None:
    result = spop("config", "check", "--config", str(ROOT / "config.example.toml"))
    assert result.exit_code == 0, result.output


def test_a_missing_config_file_is_exit_12(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["config", "show", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == EXIT_CONFIG
    assert "config file not found" in result.stderr


# -- plugins -------------------------------------------------------------------------------------
def test_plugins_json_says_where_each_came_from() -> None:
    result = spop("plugins", "--json", "--plugins-dir", str(ROOT / "plugins"))
    assert result.exit_code == 0
    data = json.loads(result.output)
    origins = {p["name"]: p["origin"] for p in data["plugins"]}
    assert origins["spop_cli.actions.print"] == "built-in"
    assert origins["webhook"] == str(ROOT / "plugins" / "webhook.py")
    actions = {a["name"]: a for a in data["actions"]}
    assert set(actions) >= {"print", "command", "url", "json", "webhook", "notify"}
    assert actions["notify"] == {
        "name": "notify",
        "plugin": "notify",
        "origin": str(ROOT / "plugins" / "notify.py"),
    }


def test_plugins_table_and_config_dirs(tmp_path: Path) -> None:
    path = tmp_path / "spop.toml"
    path.write_text(f'[plugins]\ndirs = ["{ROOT / "plugins"}"]\n')
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["plugins", "--config", str(path)])
    assert result.exit_code == 0
    assert "built-in" in result.output and "webhook" in result.output and "notify" in result.output


def test_plugins_with_a_clash_is_exit_12(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "mine.py").write_text(
        "from spop_cli import hookimpl\n\n@hookimpl\ndef register_actions(register):\n    register('json', object)\n"
    )
    result = CliRunner().invoke(cli, ["plugins", "--plugins-dir", str(tmp_path / "p")])
    assert result.exit_code == EXIT_CONFIG
    assert "action 'json' is registered twice" in result.stderr


# -- diag ------------------------------------------------------------------------------------------
def test_diag_path(diag_dir: Path) -> None:
    assert spop("diag", "path").output.strip() == str(diag_dir / "listener.000")
    assert spop("diag", "path", "--hub").output.strip() == str(diag_dir / "hub.000")


def test_diag_path_from_the_config_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SPOP_DIAG_DIR")
    path = tmp_path / "spop.toml"
    path.write_text(
        f'[diagnostics]\ndir = "{tmp_path / "logs"}"\n[hub]\ndiag_dir = "{tmp_path / "hublogs"}"\n'
    )
    assert spop("diag", "path", "--config", str(path)).output.strip() == str(
        tmp_path / "logs" / "listener.000"
    )
    assert spop("diag", "path", "--hub", "--config", str(path)).output.strip() == str(
        tmp_path / "hublogs" / "hub.000"
    )


def write_rotating(directory: Path, name: str, lines: list[str], max_bytes: int) -> None:
    """Write through the real rotating handler, as a listener or the hub does."""
    directory.mkdir(parents=True, exist_ok=True)
    handler = NumberedRotatingHandler(directory, name, max_bytes=max_bytes)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for line in lines:
        handler.emit(logging.LogRecord("spop.test", logging.INFO, __file__, 0, line, None, None))
    handler.close()


def test_diag_tail_reads_the_set_oldest_first(diag_dir: Path) -> None:
    lines = [f"line {n:03d}" for n in range(60)]
    write_rotating(diag_dir, "listener", lines, max_bytes=200)  # ~20 lines a file
    present = [
        p for p in (diag_dir / "listener.002", diag_dir / "listener.001", diag_dir / "listener.000")
    ]
    assert all(p.exists() for p in present)
    assert not (diag_dir / "listener.003").exists()
    kept = "".join(p.read_text() for p in present).splitlines()
    assert spop("diag", "tail", "-n", "5").output.splitlines() == kept[-5:]
    assert spop("diag", "tail", "-n", "1000").output.splitlines() == kept  # across the three files
    assert spop("diag", "tail", "-n", "0").output == ""


def test_diag_tail_hub_set(diag_dir: Path) -> None:
    write_rotating(diag_dir, "hub", ["hub started"], max_bytes=10_000)
    assert spop("diag", "tail", "--hub").output == "hub started\n"
    assert spop("diag", "tail").output == ""  # no listener set yet: nothing, not an error


def test_diag_tail_follows_from_where_the_last_lines_ended(diag_dir: Path) -> None:
    """Lines written between the last ones printed and the first poll are not lost (issue 17)."""
    from spop_cli.diag_reader import follow, tail

    diag_dir.mkdir()
    (diag_dir / "listener.000").write_text("one\ntwo\n")
    lines, handle = tail("listener", 1, diag_dir)
    assert lines == ["two\n"]
    with open(diag_dir / "listener.000", "a") as file:  # written before following starts
        file.write("three\nfour\n")
    seen: list[str] = []
    for line in follow("listener", diag_dir, start=handle, poll=0.01, stop=lambda: len(seen) >= 2):
        seen.append(line)
    assert seen == ["three\n", "four\n"]


def test_diag_tail_with_no_set_yet_follows_the_file_from_its_start(diag_dir: Path) -> None:
    from spop_cli.diag_reader import follow, tail

    lines, handle = tail("listener", 5, diag_dir)
    assert (lines, handle) == ([], None)
    diag_dir.mkdir()
    (diag_dir / "listener.000").write_text("first\n")
    seen: list[str] = []
    for line in follow(
        "listener", diag_dir, start=handle, from_end=False, poll=0.01, stop=lambda: len(seen) >= 1
    ):
        seen.append(line)
    assert seen == ["first\n"]


def test_diag_tail_follows_across_rotations(diag_dir: Path) -> None:
    write_rotating(diag_dir, "listener", ["before"], max_bytes=10_000)
    env = {**os.environ, "SPOP_DIAG_DIR": str(diag_dir)}
    follower = subprocess.Popen(
        [sys.executable, "-m", "spop_cli", "diag", "tail", "-n", "1", "-f"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in follower.stdout], daemon=True
    ).start()
    try:
        assert lines.get(timeout=20) == "before\n"  # it has read the set
        # 300 lines through the real handler, rotating about every 20 lines, in bursts.
        handler = NumberedRotatingHandler(diag_dir, "listener", max_bytes=400)
        handler.setFormatter(logging.Formatter("%(message)s"))
        seen: list[str] = []
        for n in range(300):
            handler.emit(
                logging.LogRecord(
                    "spop.test", logging.INFO, __file__, 0, f"event {n:04d}", None, None
                )
            )
            if n % 10 == 9:
                # A burst is half a file: the set keeps three, so nothing may be lost as long
                # as the follower keeps up burst by burst. A lost line never comes: fail at the
                # first burst that stays short, not after waiting out every one.
                deadline = time.monotonic() + 15
                while len(seen) < n + 1 and time.monotonic() < deadline:
                    try:
                        seen.append(lines.get(timeout=0.5).rstrip("\n"))
                    except queue.Empty:
                        pass
                assert seen == [f"event {k:04d}" for k in range(len(seen))], seen[-5:]
                assert len(seen) == n + 1, f"burst ending at {n}: only {len(seen)} lines"
        handler.close()
        assert seen == [f"event {n:04d}" for n in range(300)]  # none lost, none doubled, in order
    finally:
        follower.terminate()
        follower.wait(10)


# -- messages, not tracebacks ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("where", "reason"),
    [
        pytest.param(
            "/proc/nope/x.toml",
            "No such file or directory",
            marks=pytest.mark.skipif(not Path("/proc").is_dir(), reason="Linux /proc"),
        ),
        ("afile/x.toml", "(afile)"),  # its folder is a file
    ],
)
def test_config_init_where_it_cannot_write_is_exit_12(
    tmp_path: Path, monkeypatch, where: str, reason: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    result = CliRunner().invoke(cli, ["config", "init", where])
    assert result.exit_code == EXIT_CONFIG, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"spop: error: cannot write {where}: ")
    assert reason in result.stderr


@pytest.mark.parametrize("command", [["tail"], ["tail", "-f"], ["path"], ["tail", "--hub"]])
def test_diag_folder_that_is_a_file_is_exit_6(tmp_path: Path, monkeypatch, command) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("SPOP_DIAG_DIR", str(afile))
    result = CliRunner().invoke(cli, ["diag", *command])
    assert result.exit_code == 6, result.output  # SCREENPOP_Cannot_Create_Diags, as for a listener
    assert isinstance(result.exception, SystemExit)
    assert result.stderr == (
        f"spop: error: SCREENPOP_Cannot_Create_Diags: cannot read diagnostics in {afile}:"
        " not a directory\n"
    )


def test_diag_folder_from_the_config_that_is_a_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SPOP_DIAG_DIR", raising=False)
    (tmp_path / "afile").write_text("")
    path = tmp_path / "spop.toml"
    path.write_text(f'[diagnostics]\ndir = "{tmp_path / "afile"}"\n')
    result = CliRunner().invoke(cli, ["diag", "tail", "--config", str(path)])
    assert result.exit_code == 6 and "not a directory" in result.stderr


def test_config_check_warns_about_a_template_before_double_dash(tmp_path: Path) -> None:
    path = tmp_path / "spop.toml"
    path.write_text(
        '[[listeners]]\nmedia = "telephone"\nresource = "13579"\nactions = ["sorted"]\n'
        '[actions.sorted]\nplugin = "command"\nargv = ["/usr/bin/sort", "{source}", "in.txt"]\n'
    )
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output  # a warning leaves the status alone
    assert result.stdout.splitlines() == [
        "warning: actions.sorted.argv[1] = \"{source}\": a value starting with '-' would be read"
        ' as an option: put a literal "--" before the templated arguments'
        " (or pass the value as SPOP_<FIELD>)",
        f"{path}: ok (1 listener, 1 action, 1 warning)",
    ]
    # With a real problem too: the warning is listed, the status is the problem's.
    path.write_text(path.read_text() + "[server]\nreconnecting_interval = 0\n")
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert result.exit_code == EXIT_CONFIG
    assert result.stdout.startswith("warning: actions.sorted.argv[1]")
    assert "1 problem in" in result.stderr
    # The example and the starter file warn about nothing.
    example = spop("config", "check", "--config", str(ROOT / "config.example.toml"))
    assert "warning" not in example.output


def test_status_shows_the_hubs_text_literally(monkeypatch) -> None:
    hostile = "[link=https://evil.example]Call bank[/link]"
    status = {
        "version": "[/]",
        "listeners": [{"media": "telephone", "resource": hostile, "connections": 1}],
        "counters": {"[/]": 1},
    }
    monkeypatch.setattr("spop_cli.client.fetch_status", lambda *args, **kwargs: status)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["status", "--server", "6000@h"])
    assert result.exit_code == 0, result.output
    assert "(spop [/])" in result.stdout and hostile in result.stdout


def test_config_show_names_unknown_keys_and_exits_12(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('[server]\naddres = "6000@pbx"\n\n[sever]\nx = 1\n')
    result = spop("config", "show", "--config", str(path))
    assert result.exit_code == EXIT_CONFIG
    assert 'addres = "6000@pbx"' in result.stdout  # still shown
    errors = result.stderr.splitlines()
    assert errors[0].startswith("spop: error: config: sever: unknown section")
    assert errors[1].startswith('spop: error: config: server.addres = "6000@pbx": unknown key')
    assert errors[2] == (
        f"spop: error: 2 unknown names in {path} (spop config check lists every problem)"
    )


def test_config_show_of_a_good_file_is_exit_0(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    # A bad value is for `config check`; show only refuses names it does not know.
    path.write_text(
        '[server]\naddress = "6000@pbx"\n\n[[listeners]]\nmedia = "fax"\nresource = "1"\n'
    )
    result = spop("config", "show", "--config", str(path))
    assert result.exit_code == 0
    assert result.stderr == ""


def test_plugins_at_80_columns_keeps_every_name_and_path_whole(tmp_path: Path) -> None:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(
        cli, ["plugins", "--plugins-dir", str(ROOT / "plugins")]
    )
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for name in ("spop_cli.actions.print", "spop_cli.actions.command", "spop_cli.actions.json"):
        assert name in lines
    assert f"  from          {ROOT / 'plugins' / 'webhook.py'}" in lines


# -- the surface: help, usage, status words ------------------------------------------------------
def test_bare_spop_shows_the_help_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "spop_cli"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: spop [OPTIONS] [COMMAND] [ARGS]...")
    assert "spop demo" in result.stdout and "Commands:" in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["serve"], ["listen"], ["send"], ["simulate"], ["demo"], ["status"], ["plugins"],
        ["config"], ["config", "init"], ["config", "show"], ["config", "check"],
        ["diag"], ["diag", "path"], ["diag", "tail"],
    ],
)  # fmt: skip
def test_every_help_ends_with_an_example(command: list[str]) -> None:
    result = spop(*command, "--help")
    assert result.exit_code == 0
    tail = result.output.split("Example", 1)
    assert len(tail) == 2, result.output
    assert f"spop {command[0]}" in tail[1]


def test_a_usage_error_names_media_not_the_choice_list() -> None:
    result = CliRunner().invoke(cli, ["send"], prog_name="spop")
    assert result.exit_code == 2
    assert "Usage: spop send [OPTIONS] MEDIA RESOURCE" in result.output
    assert "{telephone|" not in result.output
    result = CliRunner().invoke(cli, ["listen", "--help"], prog_name="spop")
    assert "Usage: spop listen [OPTIONS] [MEDIA] [RESOURCE]" in result.output


def test_the_hub_option_help_shows_the_real_default() -> None:
    for command in ("send", "simulate", "status", "listen"):
        text = " ".join(spop(command, "--help").output.split())
        assert (
            "[default: $SPOP_SERVER, else [server] address of the config file, else 6000@localhost]"
            in text
        ), command
        assert "[default: $SPOP_TOKEN, else [server] token]" in text, command
    assert "Seconds to wait for the hub to answer each request" in " ".join(
        spop("simulate", "--help").output.split()
    )


def test_status_words_durations_and_zero_counters(monkeypatch) -> None:
    status = {
        "version": "0.1.0", "uptime": 11_533.2, "port": 6000, "http_port": None,
        "journal": None, "connections": 1, "contacts": 0, "pending": 0,
        "listeners": [{"media": "telephone", "resource": "13579", "connections": 1}],
        "counters": {"pops_accepted": 2, "delivered": 2},
    }  # fmt: skip
    monkeypatch.setattr("spop_cli.client.fetch_status", lambda *args, **kwargs: status)
    result = CliRunner(env={"COLUMNS": "120"}).invoke(cli, ["status", "--server", "6000@h"])
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()) for line in result.output.splitlines()]
    assert "up for 3 h 12 min" in lines
    assert "ports listeners 6000, no HTTP" in lines
    assert "journal off (pops in memory only)" in lines
    assert "│ pops accepted │ 2 │ pops_accepted │" in lines
    assert "│ pops expired unacknowledged │ 0 │ expired │" in lines  # zero, still shown
    assert "│ wrong or missing tokens │ 0 │ auth_failures │" in lines


def test_status_shows_every_counter_the_docs_name_at_zero_on_a_fresh_hub() -> None:
    """docs/cli.md: "every counter shown, 0 included"; the counters are those reliability.md
    lists (and cluster.md's `contact_conflicts`, `contact_writes_replayed` and
    `contact_writes_settled`). Four were
    missing while at 0."""
    import re

    from hubproc import inprocess_hub, run

    docs = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    section = docs.split("## Counters to watch", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z_]+)`", section)) - {
        "counters",
        "browser_streams",
        "connections",
    }
    named |= {"contact_conflicts", "contact_writes_replayed", "contact_writes_settled"}
    assert len(named) == 27

    async def body() -> Any:
        async with inprocess_hub() as hub:
            return await asyncio.to_thread(
                CliRunner(env={"COLUMNS": "200"}).invoke,
                cli,
                ["status", "--server", f"{hub.port}@127.0.0.1"],
            )

    result = run(body())
    assert result.exit_code == 0, result.output
    keys = {line.split("│")[-2].strip() for line in result.output.splitlines() if "│" in line}
    assert named - keys == set()


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(0, "0 s"), (59.9, "59 s"), (60, "1 min 0 s"), (3599, "59 min 59 s"), (3600, "1 h 0 min"),
     (86_399, "23 h 59 min"), (86_400, "1 d 0 h"), (200_000, "2 d 7 h")],
)  # fmt: skip
def test_durations(seconds: float, words: str) -> None:
    from spop_cli.status_view import duration

    assert duration(seconds) == words
