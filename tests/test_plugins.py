"""The plugin manager: built-ins, folders and entry points through the same hooks; clear errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from spop_cli.plugins import (
    BUILTIN,
    PluginError,
    action_types,
    build_plugin_manager,
    get_plugin_manager,
    list_plugins,
)

HELLO = """\
from spop_cli import hookimpl


class Hello:
    def __init__(self, table):
        self.name = "hello"
        self.greeting = table.get("greeting", "hi")

    def run(self, pop):
        return f"{self.greeting} {pop.source}"


@hookimpl
def register_actions(register):
    register("hello", Hello)
    register("bonjour", lambda table: Hello({"greeting": "bonjour", **table}))


@hookimpl
def spop_screen_pop(pop, listener):
    pass
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_builtins_are_plugins_like_any_other() -> None:
    pm = build_plugin_manager(entry_points=False)
    types = action_types(pm)
    assert list(types) == ["print", "command", "url", "json"]
    for name, action_type in types.items():
        assert action_type.origin == BUILTIN
        assert action_type.plugin_name == f"spop_cli.actions.{name}"
    infos = {info.name: info for info in list_plugins(pm)}
    assert infos["spop_cli.actions.url"].hooks == ["register_actions"]
    assert infos["spop_cli.actions.url"].actions == ["url"]


def test_a_folder_plugin_registers_actions_and_hooks(tmp_path: Path) -> None:
    path = write(tmp_path / "plugins", "hello.py", HELLO)
    write(tmp_path / "plugins", "_private.py", "raise RuntimeError('never loaded')")
    write(tmp_path / "plugins", "notes.txt", "not a module")
    pm = build_plugin_manager([tmp_path / "plugins"], entry_points=False)
    types = action_types(pm)
    assert types["hello"].origin == str(path)
    assert types["bonjour"].plugin_name == "hello"
    assert types["bonjour"].factory({}).greeting == "bonjour"
    (info,) = [i for i in list_plugins(pm) if i.name == "hello"]
    assert info.origin == str(path)
    assert info.hooks == ["register_actions", "spop_screen_pop"]
    assert info.actions == ["bonjour", "hello"]


def test_the_same_action_name_twice_names_both_origins(tmp_path: Path) -> None:
    path = write(
        tmp_path / "p",
        "myprint.py",
        """\
        from spop_cli import hookimpl

        @hookimpl
        def register_actions(register):
            register("print", object)
        """,
    )
    pm = build_plugin_manager([tmp_path / "p"], entry_points=False)
    with pytest.raises(PluginError) as caught:
        action_types(pm)
    message = str(caught.value)
    assert "action 'print' is registered twice" in message
    assert "spop_cli.actions.print (built-in)" in message
    assert f"myprint ({path})" in message


def test_the_same_plugin_name_in_two_folders(tmp_path: Path) -> None:
    first = write(tmp_path / "a", "hello.py", HELLO)
    second = write(tmp_path / "b", "hello.py", "x = 1\n")
    with pytest.raises(PluginError) as caught:
        build_plugin_manager([tmp_path / "a", tmp_path / "b"], entry_points=False)
    assert str(first) in str(caught.value) and str(second) in str(caught.value)


def test_a_plugin_that_fails_to_import_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p", "broken.py", "import os\n\nraise RuntimeError('no CRM token')\n")
    with pytest.raises(PluginError) as caught:
        build_plugin_manager([tmp_path / "p"], entry_points=False)
    message = str(caught.value)
    assert message == f"plugin file {path} failed to import: line 3: RuntimeError: no CRM token"
    assert "Traceback" not in message


def test_a_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p", "typo.py", "def register_actions(register)\n    pass\n")
    with pytest.raises(PluginError, match=r"typo.py failed to import: line 1: SyntaxError"):
        build_plugin_manager([tmp_path / "p"], entry_points=False)
    assert path.exists()


def test_a_misspelled_hook_is_an_error(tmp_path: Path) -> None:
    write(
        tmp_path / "p",
        "misspelled.py",
        """\
        from spop_cli import hookimpl

        @hookimpl
        def register_action(register):
            pass
        """,
    )
    with pytest.raises(
        PluginError, match="plugin 'misspelled' from .* is invalid.*register_action"
    ):
        build_plugin_manager([tmp_path / "p"], entry_points=False)


def test_a_register_hook_that_raises_is_reported(tmp_path: Path) -> None:
    write(
        tmp_path / "p",
        "angry.py",
        """\
        from spop_cli import hookimpl

        @hookimpl
        def register_actions(register):
            raise KeyError("CRM_URL")
        """,
    )
    pm = build_plugin_manager([tmp_path / "p"], entry_points=False)
    with pytest.raises(PluginError, match="plugin 'angry' .* failed in register_actions: KeyError"):
        action_types(pm)


def test_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="plugin folder .*nope does not exist"):
        build_plugin_manager([tmp_path / "nope"], entry_points=False)


def test_entry_points_of_group_spop(tmp_path: Path, monkeypatch) -> None:
    # An installed distribution, as pip would leave it: a module and its dist-info.
    write(tmp_path, "spop_fake_plugin.py", HELLO)
    dist = tmp_path / "spop_fake-1.0.dist-info"
    write(dist, "METADATA", "Metadata-Version: 2.1\nName: spop-fake\nVersion: 1.0\n")
    write(dist, "entry_points.txt", "[spop]\nfake = spop_fake_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = build_plugin_manager()
    types = action_types(pm)
    assert types["hello"].origin == "entry point spop-fake"
    assert types["hello"].plugin_name == "fake"
    assert "entry point spop-fake" in {info.origin for info in list_plugins(pm)}


def test_an_entry_point_that_fails_names_its_distribution(tmp_path: Path, monkeypatch) -> None:
    write(tmp_path, "spop_bad_plugin.py", "raise ImportError('needs requests')\n")
    dist = tmp_path / "spop_bad-2.0.dist-info"
    write(dist, "METADATA", "Metadata-Version: 2.1\nName: spop-bad\nVersion: 2.0\n")
    write(dist, "entry_points.txt", "[spop]\nbad = spop_bad_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        PluginError, match=r"plugin 'bad' \(entry point spop-bad, spop_bad_plugin\) failed"
    ):
        build_plugin_manager()


def test_get_plugin_manager_builds_once_per_set_of_folders(tmp_path: Path) -> None:
    write(tmp_path / "p", "hello.py", HELLO)
    first = get_plugin_manager([tmp_path / "p"])
    assert get_plugin_manager([str(tmp_path / "p")]) is first
    assert get_plugin_manager([]) is not first


def test_hookimpl_is_public() -> None:
    from spop_cli import hookimpl
    from spop_cli.hookspecs import hookimpl as same

    assert hookimpl is same
