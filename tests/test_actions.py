"""The built-in actions for real: a real program for `command`, real files for `json`."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from guide_pops import guide_pop
from spop_cli.actions import (
    ActionConfigError,
    ActionError,
    configure_action,
)
from spop_cli.actions.command import CommandAction, env_name, pop_environment
from spop_cli.actions.json import JsonAction
from spop_cli.actions.print import PrintAction, summary_line
from spop_cli.actions.url import UrlAction
from spop_cli.model import ScreenPopEvent
from spop_cli.plugins import action_types, build_plugin_manager

# A program that records its arguments and the SPOP_* environment, as JSON, in $OUT.
RECORDER = """\
import json, os, sys
with open(os.environ["OUT"], "w", encoding="utf-8") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items()
               if k.startswith("SPOP_") or k == "CRM"}}, f)
"""


def make_pop(**changes: object) -> ScreenPopEvent:
    return guide_pop(contact_data={"code1": "chaîne1", "ticket-no": "T 42"}, **changes)


@pytest.fixture
def recorder(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    return script, tmp_path / "recorded.json"


def recorded(out: Path) -> dict:
    return json.loads(out.read_text(encoding="utf-8"))


# -- command -------------------------------------------------------------------------------------
def test_command_fills_single_arguments_and_the_environment(recorder) -> None:
    script, out = recorder
    action = CommandAction(
        {
            "argv": [
                sys.executable,
                str(script),
                "{source}",
                "{contact_data[code1]}",
                "q={queue_name}",
            ],
            "env": {"CRM": "prod", "OUT": str(out)},
        }
    )
    action.run(make_pop())
    got = recorded(out)
    assert got["argv"] == ["12345", "chaîne1", "q=File d'attente des ventes"]
    env = got["env"]
    assert env["CRM"] == "prod"
    assert env["SPOP_SOURCE"] == "12345"
    assert env["SPOP_QUEUE_NAME"] == "File d'attente des ventes"
    assert env["SPOP_FROM"] == ""
    assert env["SPOP_WAIT_TIME"] == "10"
    assert env["SPOP_MEDIA"] == "telephone"
    assert env["SPOP_RESOURCE"] == "13579"
    assert env["SPOP_DATA_CODE1"] == "chaîne1"
    assert env["SPOP_DATA_TICKET_NO"] == "T 42"
    assert json.loads(env["SPOP_CONTACT_DATA"]) == {"code1": "chaîne1", "ticket-no": "T 42"}


def test_shell_metacharacters_stay_literal(recorder, tmp_path: Path) -> None:
    script, out = recorder
    victim = tmp_path / "x"
    evil = f"$(touch {victim}); rm -rf {tmp_path} `touch {victim}` | tee {victim} && echo ;"
    action = CommandAction(
        {
            "argv": [sys.executable, str(script), "{source}", "{queue_name}"],
            "env": {"OUT": str(out)},
        }
    )
    action.run(make_pop(source=evil, queue_name="a b\tc\nd"))
    got = recorded(out)
    assert got["argv"] == [evil, "a b\tc\nd"]  # one argument each, as given
    assert got["env"]["SPOP_SOURCE"] == evil
    assert not victim.exists()
    assert script.exists()


def test_a_field_cannot_add_arguments_even_when_empty(recorder) -> None:
    script, out = recorder
    action = CommandAction(
        {"argv": [sys.executable, str(script), "{from}", "{redirect}"], "env": {"OUT": str(out)}}
    )
    action.run(make_pop())
    assert recorded(out)["argv"] == ["", ""]


def test_nul_bytes_are_dropped_not_fatal(recorder) -> None:
    script, out = recorder
    action = CommandAction(
        {"argv": [sys.executable, str(script), "{source}"], "env": {"OUT": str(out)}}
    )
    action.run(make_pop(source="12\x0034"))
    assert recorded(out)["argv"] == ["1234"]


def test_non_zero_exit_is_a_failure_with_output_in_diagnostics(tmp_path: Path, caplog) -> None:
    script = tmp_path / "bad.py"
    script.write_text(
        "import sys\nprint('to stdout')\nprint('it broke', file=sys.stderr)\nsys.exit(3)\n"
    )
    action = CommandAction({"argv": [sys.executable, str(script)]})
    with (
        caplog.at_level(logging.DEBUG, logger="spop.listener"),
        pytest.raises(ActionError) as caught,
    ):
        action.run(make_pop())
    assert "exited with status 3: it broke" in str(caught.value)
    logged = caplog.text
    assert "exited 3" in logged
    assert "to stdout" in logged
    assert "it broke" in logged


def test_output_of_a_good_run_goes_to_diagnostics(tmp_path: Path, caplog) -> None:
    action = CommandAction({"argv": [sys.executable, "-c", "print('hello from the hook')"]})
    with caplog.at_level(logging.DEBUG, logger="spop.listener"):
        action.run(make_pop())
    assert "hello from the hook" in caplog.text
    assert "exited 0" in caplog.text


def test_timeout_kills_the_program_and_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # A shell that starts a child: the kill must reach both.
    action = CommandAction(
        {"argv": ["/bin/sh", "-c", f"sleep 30 & echo $$ $! > {pids}; wait"], "timeout": 0.5}
    )
    started = time.monotonic()
    with pytest.raises(ActionError, match="timed out after 0.5 s and was killed"):
        action.run(make_pop())
    assert time.monotonic() - started < 5
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 5  # SIGKILL is delivered, not awaited
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(pid), pid


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_a_missing_program_is_a_failure(tmp_path: Path) -> None:
    action = CommandAction({"argv": [str(tmp_path / "nope")]})
    with pytest.raises(ActionError, match="cannot run"):
        action.run(make_pop())


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        ({}, "argv", "is required"),
        ({"argv": []}, "argv", "must name a program"),
        ({"argv": "ls -l"}, "argv", "must be a list"),
        ({"argv": ["{source}"]}, "argv[0]", "the program must be literal"),
        ({"argv": ["ls", 3]}, "argv[1]", "must be a string"),
        ({"argv": ["ls", "{sourc}"]}, "argv[1]", "unknown field {sourc}"),
        ({"argv": ["ls"], "env": {"A": 1}}, "env.A", "must be a string"),
        ({"argv": ["ls"], "timeout": 0}, "timeout", "positive number"),
        ({"argv": ["ls"], "timeout": True}, "timeout", "must be an integer or a number"),
        ({"argv": ["ls"], "shell": True}, "shell", "unknown key"),
    ],
)
def test_command_config_errors_name_the_key(table: dict, key: str, fragment: str) -> None:
    with pytest.raises(ActionConfigError) as caught:
        CommandAction(table)
    assert caught.value.key == key
    assert fragment in caught.value.message


def test_env_names() -> None:
    assert env_name("code1") == "CODE1"
    assert env_name("ticket-no") == "TICKET_NO"
    assert env_name("clé é") == "CL___"
    assert set(pop_environment(make_pop())) >= {"SPOP_ID", "SPOP_CONTACT_ID", "SPOP_CREATED_AT"}


def test_command_waits_a_little_longer_than_its_own_kill() -> None:
    types = action_types(build_plugin_manager(entry_points=False))
    configured = configure_action(
        types, "hook", {"plugin": "command", "argv": ["true"], "timeout": 3}
    )
    assert configured.timeout == 5.0
    assert configured.action.kill_after == 3.0


# -- url ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "encoded"),
    [
        ("12345", "12345"),
        ("a&b=c", "a%26b%3Dc"),
        ("x#frag", "x%23frag"),
        ("with space", "with%20space"),
        ("chaîne/€?", "cha%C3%AEne%2F%E2%82%AC%3F"),
        ("+33 1 23", "%2B33%201%2023"),
        ("%41", "%2541"),
        ("javascript:alert(1)", "javascript%3Aalert%281%29"),
    ],
)
def test_url_encodes_every_value(source: str, encoded: str) -> None:
    stream = io.StringIO()
    action = UrlAction(
        {
            "url": "https://crm.example.com/search?phone={source}&q=1#top",
            "dry_run": True,
            "stream": stream,
        }
    )
    action.run(make_pop(source=source))
    assert stream.getvalue() == f"https://crm.example.com/search?phone={encoded}&q=1#top\n"


def test_url_dry_run_from_the_environment(monkeypatch) -> None:
    stream = io.StringIO()
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url, new=0: opened.append(url) or True)
    monkeypatch.setenv("SPOP_URL_DRY_RUN", "1")
    action = UrlAction({"url": "https://crm/{contact_data[code1]}", "stream": stream})
    action.run(make_pop())
    assert stream.getvalue() == "https://crm/cha%C3%AEne1\n"
    assert opened == []


def test_url_opens_the_browser(monkeypatch) -> None:
    opened = []
    monkeypatch.delenv("SPOP_URL_DRY_RUN", raising=False)
    monkeypatch.setattr("webbrowser.open", lambda url, new=0: opened.append((url, new)) or True)
    UrlAction({"url": "https://crm/?q={queue_name}"}).run(make_pop(queue_name="Ventes Paris"))
    assert opened == [("https://crm/?q=Ventes%20Paris", 2)]


def test_url_without_a_browser_is_a_failure(monkeypatch) -> None:
    monkeypatch.delenv("SPOP_URL_DRY_RUN", raising=False)
    monkeypatch.setattr("webbrowser.open", lambda url, new=0: False)
    with pytest.raises(ActionError, match="no browser"):
        UrlAction({"url": "https://crm/"}).run(make_pop())


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        ({}, "url", "is required"),
        ({"url": "{source}"}, "url", "literal scheme"),
        ({"url": "crm/{source}"}, "url", "literal scheme"),
        ({"url": "https://x/{nope}"}, "url", "unknown field {nope}"),
        ({"url": "https://x/", "dry_run": "yes"}, "dry_run", "must be true or false"),
        ({"url": "https://x/", "stream": "stdlog"}, "stream", "stdout"),
    ],
)
def test_url_config_errors(table: dict, key: str, fragment: str) -> None:
    with pytest.raises(ActionConfigError) as caught:
        UrlAction(table)
    assert caught.value.key == key
    assert fragment in caught.value.message


# -- json --------------------------------------------------------------------------------------
def test_json_appends_one_flushed_line_per_pop(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "pops.ndjson"
    path.parent.mkdir()
    path.write_text('{"earlier": true}\n')
    action = JsonAction({"path": str(path)})
    first, second = make_pop(), make_pop(source="67890")
    action.run(first)
    # Flushed: readable before any close.
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    action.run(second)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    record = json.loads(lines[1])
    assert {k: v for k, v in record.items() if k != "received_at"} == first.to_dict()
    assert record["received_at"].endswith("Z")
    assert record["contact_data"] == {"code1": "chaîne1", "ticket-no": "T 42"}
    assert "chaîne1" in lines[1]  # UTF-8, not \\u escapes
    assert json.loads(lines[2])["source"] == "67890"
    action.close()


def test_json_creates_the_folder(tmp_path: Path) -> None:
    path = tmp_path / "new" / "pops.ndjson"
    action = JsonAction({"path": str(path)})
    action.run(make_pop())
    action.close()
    assert len(path.read_text().splitlines()) == 1


def test_json_dash_is_stdout(capsys) -> None:
    JsonAction({"path": "-"}).run(make_pop())
    out = capsys.readouterr().out
    assert json.loads(out)["source"] == "12345"


# -- print -------------------------------------------------------------------------------------
def test_print_plain_line_when_not_a_terminal() -> None:
    stream = io.StringIO()
    pop = make_pop()
    PrintAction({"stream": stream}).run(pop)
    out = stream.getvalue()
    assert out.count("\n") == 1
    assert out == summary_line(pop) + "\n"
    assert "telephone 13579 source=12345 destination=2468" in out
    assert "code1='chaîne1'" in out


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_print_panel_on_a_terminal() -> None:
    stream = FakeTerminal()
    PrintAction({"stream": stream}).run(make_pop())
    out = stream.getvalue()
    assert "telephone pop for 13579" in out
    assert "File d'attente des ventes" in out
    assert "chaîne1" in out
    assert out.count("\n") > 3


def test_print_defaults_to_stdout_looked_up_at_each_pop(capsys) -> None:
    action = PrintAction({})
    action.run(make_pop())
    assert "13579" in capsys.readouterr().out


# -- every action through configure_action -----------------------------------------------------
def test_configure_action_defaults_the_type_to_the_name() -> None:
    types = action_types(build_plugin_manager(entry_points=False))
    configured = configure_action(types, "print", {})
    assert (configured.name, configured.type, configured.when, configured.timeout) == (
        "print",
        "print",
        None,
        30.0,
    )
    crm = configure_action(
        types,
        "crm",
        {"plugin": "url", "url": "https://x/{source}", "when": {"queue_name": "V*"}, "timeout": 4},
    )
    assert crm.type == "url" and crm.timeout == 4.0
    assert crm.when is not None and not crm.when.matches(make_pop())


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"plugin": "nope"}, "plugin"),
        ({"plugin": 3}, "plugin"),
        ({"plugin": "print", "when": {"queue": "x"}}, "when"),
        ({"plugin": "print", "timeout": -1}, "timeout"),
        ({"plugin": "print", "colour": "red"}, "colour"),
    ],
)
def test_configure_action_errors(table: dict, key: str) -> None:
    types = action_types(build_plugin_manager(entry_points=False))
    with pytest.raises(ActionConfigError) as caught:
        configure_action(types, "x", table)
    assert caught.value.key == key


def test_environment_keeps_the_process_environment(monkeypatch) -> None:
    monkeypatch.setenv("KEEP_ME", "yes")
    action = CommandAction({"argv": ["true"]})
    assert action.environment(make_pop())["KEEP_ME"] == "yes"
    assert os.environ.get("SPOP_SOURCE") is None  # never leaks into our own environment


# A caller's text must never be read as Rich markup: not a clickable link, not a crash.
HOSTILE_SOURCES = ["[link=https://evil.example]Call bank[/link]", "[/]", "[bold]x[/bold] [red]"]


@pytest.mark.parametrize("source", HOSTILE_SOURCES)
def test_print_panel_shows_caller_text_literally(source: str, monkeypatch) -> None:
    from rich.console import Console

    from spop_cli.actions.print import pop_panel

    pop = guide_pop(source=source, contact_data={"[/]": source})
    forced = io.StringIO()
    Console(file=forced, force_terminal=True, color_system="truecolor", width=200).print(
        pop_panel(pop)
    )
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("NO_COLOR", raising=False)
    terminal = FakeTerminal()
    PrintAction({"stream": terminal}).run(pop)  # the action's own console, in terminal mode
    for out in (forced.getvalue(), terminal.getvalue()):
        assert "\x1b[" in out  # really rendered for a terminal
        assert source in out
        assert "\x1b]8;" not in out  # no OSC-8 hyperlink


@pytest.mark.skipif(not Path("/usr/bin/sort").exists(), reason="needs /usr/bin/sort")
def test_double_dash_keeps_a_dash_value_from_being_an_option(tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    (tmp_path / "in.txt").write_text("b\na\n")
    pop = make_pop(source=f"-o{pwned}")
    unguarded = CommandAction(
        {"argv": ["/usr/bin/sort", "{source}", "in.txt"], "cwd": str(tmp_path)}
    )
    assert [key for key, _ in unguarded.warnings] == ["argv[1]"]
    unguarded.run(pop)
    assert pwned.exists()  # the review's finding: the caller picked sort's output file
    pwned.unlink()
    guarded = CommandAction(
        {"argv": ["/usr/bin/sort", "--", "{source}", "in.txt"], "cwd": str(tmp_path)}
    )
    assert guarded.warnings == []
    with pytest.raises(ActionError, match="exited with status"):
        guarded.run(pop)  # sort looks for a file named "-o…" and fails; it writes nothing
    assert not pwned.exists()


# The `--json` line and the json action's line: exactly what json.dumps(ensure_ascii=False) gives
# the pop's record, whichever way it is written (a pop of from_dict's types is put together from
# the standard encoder's string encoding; anything else goes through json.dumps).
AWKWARD_TEXTS = [
    "",
    'a "quoted", colon: comma',
    'back\\slash \\" \\u0041',
    "tab\tnew\nline\rcr\x00nul\x1f\x7fdel\x08\x0c",
    "chaîne é ü ß 漢字 🎉",
    "\u2028\u2029 separators",
    "\ud800 lone surrogate",
    '{}[]:,"',
]


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_pop_line_is_json_dumps_of_the_record_for_any_text(text: str) -> None:
    from spop_cli.actions.json import pop_line, pop_record

    pop = ScreenPopEvent.from_dict(
        {
            "media": "telephone",
            "resource": text or "r",
            "id": text or "i",
            "contact_id": text,
            "source": text,
            "destination": text,
            "queue_name": text,
            "contact_description": text,
            "from": text,
            "redirect": text,
            "wait_time": 7,
            "contact_data": {text: text, "k": "v", "other" + text: ""},
        }
    )
    at = "2026-12-03T00:00:00.000Z"
    assert pop_line(pop, at) == json.dumps(pop_record(pop, at), ensure_ascii=False) + "\n"
    assert json.loads(pop_line(pop, at)) == {**pop.to_dict(), "received_at": at}


@pytest.mark.parametrize(
    "changes",
    [
        {"wait_time": 1.5},  # a float, set by hand: json.dumps writes it
        {"wait_time": True},
        {"wait_time": 10**30},
        {"source": 12345},  # a number where a string belongs
        {"queue_name": None},
    ],
)
def test_pop_line_of_a_hand_made_pop_is_still_json_dumps(changes: dict) -> None:
    from spop_cli.actions.json import pop_line, pop_record

    pop = make_pop()
    for name, value in changes.items():
        setattr(pop, name, value)
    at = "2026-12-03T00:00:00.000Z"
    assert pop_line(pop, at) == json.dumps(pop_record(pop, at), ensure_ascii=False) + "\n"
