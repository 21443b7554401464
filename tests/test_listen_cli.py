"""`spop listen` and `spop status` end to end: a real hub, `spop listen` as a real process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from spop_cli.cli import EXIT_ACTION_FAILED, EXIT_CODES, EXIT_CONFIG, EXIT_TIMEOUT, cli

pytest.importorskip("spop_cli.hub.server")
from conftest import HubThread, wait_for  # noqa: E402
from guide_pops import GUIDE_POP  # noqa: E402

# Appends its arguments as one JSON line to the file named by $OUT.
APPEND_ARGV = (
    "import json, os, sys\nopen(os.environ['OUT'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
)


def listen(*args: str, tmp_path: Path, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag"), **(env or {})}
    for name in ("SPOP_CONFIG", "SPOP_SERVER", "SPOP_TOKEN"):
        if name not in (env or {}):
            full_env.pop(name, None)
    full_env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")  # never the user's own config file
    return subprocess.Popen(
        [sys.executable, "-m", "spop_cli", "listen", *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def registered(hub: HubThread, *resources: str) -> bool:
    names = {row["resource"] for row in hub.status()["listeners"]}
    return all(resource in names for resource in resources)


def wait_registered(hub: HubThread, process: subprocess.Popen, *resources: str) -> None:
    ok = wait_for(lambda: registered(hub, *resources) or process.poll() is not None, timeout=20)
    assert ok and process.poll() is None, process.communicate(timeout=5)


def finish(process: subprocess.Popen, timeout: float = 30) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def test_once_json_prints_one_pop_and_exits_0(hub: HubThread, tmp_path: Path) -> None:
    process = listen(
        "telephone", "13579", "--server", hub.address, "--once", "--json", tmp_path=tmp_path
    )
    wait_registered(hub, process, "13579")
    (pop_id,) = hub.publish(GUIDE_POP)
    code, out, err = finish(process)
    assert code == 0, err
    (line,) = out.splitlines()
    pop = json.loads(line)
    assert pop["id"] == pop_id
    for key, value in GUIDE_POP.items():
        assert pop[key] == value
    assert pop["from"] == "" and pop["redirect"] == ""
    assert pop["received_at"].endswith("Z")
    assert "Status_Idle -> Status_Up" in err
    assert wait_for(lambda: not registered(hub, "13579"))  # it unregistered on the way out
    diag = (tmp_path / "diag" / "listener.000").read_text()
    assert pop_id in diag


def test_count_runs_every_action_for_every_listener(hub: HubThread, tmp_path: Path) -> None:
    script = tmp_path / "append.py"
    script.write_text(APPEND_ARGV)
    config = tmp_path / "spop.toml"
    config.write_text(
        f"""
[server]
address = "{hub.address}"

[[listeners]]
media = "telephone"
resource = "13579"
actions = ["hook", "log"]

[[listeners]]
media = "email"
resource = "agent7"
actions = ["log"]

[actions.hook]
plugin = "command"
argv = ["{sys.executable}", "{script}", "{{source}}", "{{contact_data[code1]}}"]
env = {{ OUT = "{tmp_path / "hook.ndjson"}" }}

[actions.log]
plugin = "json"
path = "{tmp_path / "pops.ndjson"}"
"""
    )
    process = listen("--config", str(config), "--count", "2", "--timeout", "30", tmp_path=tmp_path)
    wait_registered(hub, process, "13579", "agent7")
    # both listeners on one connection (docs/cli.md): the hub counts one
    status = hub.status()
    assert (status["connections"], status["registrations"]) == (1, 2)
    hub.publish(GUIDE_POP)
    hub.publish({"media": "email", "resource": "agent7", "source": "client@example.com"})
    code, out, err = finish(process)
    assert code == 0, err
    assert out == ""  # plain mode: the log is on stderr
    assert [json.loads(line) for line in (tmp_path / "hook.ndjson").read_text().splitlines()] == [
        ["12345", "chaîne1"]
    ]
    logged = [json.loads(line) for line in (tmp_path / "pops.ndjson").read_text().splitlines()]
    assert sorted(pop["resource"] for pop in logged) == ["13579", "agent7"]
    assert "action hook ok" in err
    assert "spop: 2 pops, 0 action failures" in err


def test_a_failed_action_makes_once_exit_14(hub: HubThread, tmp_path: Path) -> None:
    config = tmp_path / "spop.toml"
    config.write_text(
        '[actions.bad]\nplugin = "command"\nargv = ["/bin/sh", "-c", "echo crm down >&2; exit 4"]\n'
    )
    process = listen(
        "telephone", "13579", "--server", hub.address, "--config", str(config), "--action", "bad",
        "--action", "print", "--once", tmp_path=tmp_path,
    )  # fmt: skip
    wait_registered(hub, process, "13579")
    hub.publish(GUIDE_POP)
    code, out, err = finish(process)
    assert code == EXIT_ACTION_FAILED, err
    assert "action bad failed" in err and "exited with status 4: crm down" in err
    assert "action print ok" in err
    assert "telephone 13579 source=12345" in out  # the print action, a plain line off a terminal
    assert "crm down" in (tmp_path / "diag" / "listener.000").read_text()


def test_timeout_without_pops_exits_15(hub: HubThread, tmp_path: Path) -> None:
    process = listen(
        "callback",
        "agent1",
        "--server",
        hub.address,
        "--once",
        "--timeout",
        "0.5",
        tmp_path=tmp_path,
    )
    code, _, err = finish(process)
    assert code == EXIT_TIMEOUT, err
    assert "spop: error: timeout: 0 of 1 pop in 0.5 s" in err


def test_timeout_alone_listens_that_long_and_exits_0(hub: HubThread, tmp_path: Path) -> None:
    process = listen(
        "callback", "agent1", "--server", hub.address, "--timeout", "0.5", tmp_path=tmp_path
    )
    code, _, err = finish(process)
    assert code == 0, err


def test_unreachable_hub_names_the_code(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = listen(
        "telephone",
        "13579",
        "--server",
        f"{port}@127.0.0.1",
        "--connect-timeout",
        "2",
        tmp_path=tmp_path,
    )
    code, _, err = finish(process)
    assert code == EXIT_CODES["SCREENPOP_Cannot_Find_HiPath_ProCenter"]
    assert "spop: error: SCREENPOP_Cannot_Find_HiPath_ProCenter:" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_listening_cleanly(hub: HubThread, tmp_path: Path, sig: int) -> None:
    process = listen("webcollab", "agent9", "--server", hub.address, tmp_path=tmp_path)
    wait_registered(hub, process, "agent9")
    process.send_signal(sig)
    code, _, err = finish(process)
    assert code == 0, err
    assert "Status_Up -> Status_Idle" in err and "Status_Idle -> Status_Down" in err
    assert not registered(hub, "agent9")


def test_a_hanging_action_does_not_delay_another_listener(hub: HubThread, tmp_path: Path) -> None:
    config = tmp_path / "spop.toml"
    config.write_text(
        f"""
[[listeners]]
media = "telephone"
resource = "1001"
actions = ["slow"]

[[listeners]]
media = "telephone"
resource = "1002"
actions = ["log"]

[actions.slow]
plugin = "command"
argv = ["sleep", "2"]

[actions.log]
plugin = "json"
path = "{tmp_path / "fast.ndjson"}"
"""
    )
    process = listen(
        "--config",
        str(config),
        "--server",
        hub.address,
        "--count",
        "2",
        "--json",
        tmp_path=tmp_path,
    )
    wait_registered(hub, process, "1001", "1002")
    hub.publish({**GUIDE_POP, "resource": "1001"})
    started = time.monotonic()
    hub.publish({**GUIDE_POP, "resource": "1002"})
    fast = tmp_path / "fast.ndjson"
    assert wait_for(lambda: fast.exists() and fast.read_text().endswith("\n"), timeout=10)
    assert time.monotonic() - started < 1.5  # not behind the 2 s action
    code, out, err = finish(process)
    assert code == 0, err  # and the slow one still ran to the end before exit
    assert len(out.splitlines()) == 2
    assert "action slow ok" in err


def test_json_keeps_stdout_for_pops_only(hub: HubThread, tmp_path: Path) -> None:
    process = listen(
        "telephone", "13579", "--server", hub.address, "--once", "--json", "--action", "print",
        tmp_path=tmp_path, env={"SPOP_URL_DRY_RUN": "1"},
    )  # fmt: skip
    wait_registered(hub, process, "13579")
    hub.publish(GUIDE_POP)
    code, out, err = finish(process)
    assert code == 0, err
    assert [json.loads(line)["source"] for line in out.splitlines()] == ["12345"]
    assert "telephone 13579 source=12345" in err  # the print action went to stderr


def test_the_server_and_token_come_from_the_environment(tmp_path: Path) -> None:
    guarded = HubThread(token="s3cret")
    try:
        process = listen("email", "agent3", "--once", "--timeout", "20", tmp_path=tmp_path,
                         env={"SPOP_SERVER": guarded.address, "SPOP_TOKEN": "s3cret"})  # fmt: skip
        wait_registered(guarded, process, "agent3")
        guarded.publish({"media": "email", "resource": "agent3", "source": "a@b.c"})
        code, _, err = finish(process)
        assert code == 0, err
        refused = listen(
            "email", "agent3", "--server", guarded.address, "--token", "wrong", tmp_path=tmp_path
        )
        code, _, err = finish(refused)
        assert code in (
            EXIT_CODES["SCREENPOP_Initialization_Error"],
            EXIT_CODES["SCREENPOP_Cannot_Register"],
        )
        assert "spop: error: SCREENPOP_" in err
    finally:
        guarded.close()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--action", "nope"], "--action nope: unknown action"),
        (["--action", "url"], "actions.url.url: is required"),
    ],
)
def test_bad_actions_exit_12(
    hub: HubThread, tmp_path: Path, args: list[str], fragment: str
) -> None:
    process = listen("telephone", "1", "--server", hub.address, *args, tmp_path=tmp_path)
    code, _, err = finish(process)
    assert code == EXIT_CONFIG
    assert fragment in err


def test_nothing_to_listen_to_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = finish(listen(tmp_path=tmp_path))
    assert code == 2
    assert "nothing to listen to" in err


def test_status_shows_listeners_and_counters(hub: HubThread, tmp_path: Path) -> None:
    process = listen("telephone", "24680", "--server", hub.address, tmp_path=tmp_path)
    try:
        wait_registered(hub, process, "24680")
        hub.publish({**GUIDE_POP, "resource": "24680"})
        result = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["status", "--server", hub.address])
        assert result.exit_code == 0, result.output
        assert "24680" in result.output and "telephone" in result.output
        assert "pops_accepted" in result.output
        result = CliRunner().invoke(cli, ["status", "--server", hub.address, "--json"])
        data = json.loads(result.output)
        assert {"media": "telephone", "resource": "24680", "connections": 1} in data["listeners"]
        assert data["counters"]["pops_accepted"] >= 1
    finally:
        process.send_signal(signal.SIGINT)
        finish(process)


def test_status_of_an_unreachable_hub(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = CliRunner().invoke(cli, ["status", "--server", f"{port}@127.0.0.1", "--timeout", "2"])
    assert result.exit_code == EXIT_CODES["SCREENPOP_Cannot_Find_HiPath_ProCenter"]
    assert "SCREENPOP_Cannot_Find_HiPath_ProCenter" in result.output


def test_live_view_on_a_terminal(hub: HubThread, tmp_path: Path) -> None:
    """stdout is a real pseudo-terminal: the rich live view shows the listener and the pop."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag"), "COLUMNS": "160", "LINES": "40"}
    env.pop("SPOP_SERVER", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "spop_cli", "listen", "telephone", "13579", "--server", hub.address,
         "--once", "--action", "print", "--timeout", "20"],
        env=env, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []

    def read_available() -> None:
        import select

        while select.select([master], [], [], 0.05)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    try:
        wait_registered(hub, process, "13579")
        hub.publish(GUIDE_POP)
        deadline = time.monotonic() + 20
        while process.poll() is None and time.monotonic() < deadline:
            read_available()
        read_available()
        assert process.wait(5) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace"))
    final = screen[screen.rindex("spop listen ·") :]  # the last frame, left on screen at exit
    assert "latest pops" in final
    assert "Status_Down" in final  # stopped and shut down cleanly
    assert "12345" in final and "File d'attente des ventes" in final
    assert "✓ print" in final
    assert "1/1 pops" in final
    assert "telephone pop for 13579" in screen  # the print action's panel, above the live view


def test_a_relative_program_runs_from_any_folder(hub: HubThread, tmp_path: Path) -> None:
    """The systemd unit starts `spop listen` from /: `./hooks/append.py` is the config's."""
    hooks = tmp_path / "conf" / "hooks"
    hooks.mkdir(parents=True)
    script = hooks / "append.py"
    script.write_text(f"#!{sys.executable}\n{APPEND_ARGV}")
    script.chmod(0o755)
    config = tmp_path / "conf" / "config.toml"
    config.write_text(
        '[[listeners]]\nmedia = "telephone"\nresource = "13579"\nactions = ["hook"]\n\n'
        '[actions.hook]\nplugin = "command"\nargv = ["./hooks/append.py", "--", "{source}"]\n'
    )
    out = tmp_path / "out.ndjson"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag"), "OUT": str(out)}
    for name in ("SPOP_CONFIG", "SPOP_SERVER", "SPOP_TOKEN"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "spop_cli", "listen", "--config", str(config),
         "--server", hub.address, "--once", "--timeout", "30"],
        cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_registered(hub, process, "13579")
    hub.publish(GUIDE_POP)
    code, _, err = finish(process)
    assert code == 0, err
    assert [json.loads(line) for line in out.read_text().splitlines()] == [["--", "12345"]]


def test_without_actions_off_a_terminal_each_pop_is_a_plain_line(
    hub: HubThread, tmp_path: Path
) -> None:
    process = listen("telephone", "13579", "--server", hub.address, "--once", tmp_path=tmp_path)
    wait_registered(hub, process, "13579")
    (pop_id,) = hub.publish({**GUIDE_POP, "from": "13580"})
    code, out, err = finish(process)
    assert code == 0, err
    assert out == ""  # pops go to standard output only with --json
    (line,) = [line for line in err.splitlines() if f"pop {pop_id}" in line]
    assert line.endswith(
        f"telephone 13579: pop {pop_id} source='12345' destination='2468'"
        " queue=\"File d'attente des ventes\" description='Ventes' from='13580' wait=10s"
        " data.code1='chaîne1'"
    )
    assert err.splitlines()[-1] == "spop: 1 pop, 0 action failures"
