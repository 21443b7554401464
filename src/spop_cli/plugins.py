"""The plugin manager: built-in actions, entry points (group `spop`) and plugin folders, one set of hooks.

The built-in actions under `spop_cli.actions` register through the same `register_actions` hook a
third party uses; `spop plugins` shows where each plugin and action type came from.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "spop"
BUILTIN_ACTIONS = ("print", "command", "url", "json")
BUILTIN_SOURCES: tuple[str, ...] = ("asterisk", "twilio", "webhook")  # spop_cli.sources modules
BUILTIN = "built-in"


class PluginError(Exception):
    """A plugin that cannot be loaded or that clashes with another; the message names the file."""


@dataclass(frozen=True)
class ActionType:
    """A registered action type: `factory(config_table)` returns an action."""

    name: str
    factory: Callable[[dict[str, Any]], Any]
    plugin_name: str
    origin: str  # "built-in", "entry point <dist>", or the plugin file's path


@dataclass(frozen=True)
class SourceType:
    """A registered source type: `factory(config_table)` returns a `spop_cli.sources.Source`."""

    name: str
    factory: Callable[[dict[str, Any]], Any]
    plugin_name: str
    origin: str
    description: str = ""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    origin: str
    hooks: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus where each plugin came from, and its action types once collected."""

    def __init__(self) -> None:
        super().__init__("spop")
        self.add_hookspecs(hookspecs)
        self.origins: dict[str, str] = {}
        self.loaded_files: dict[Path, str] = {}
        self._action_types: dict[str, ActionType] | None = None
        self._source_types: dict[str, SourceType] | None = None

    def add_plugin(self, plugin: Any, name: str, origin: str) -> None:
        """Register one plugin; a second plugin with the same name is an error naming both."""
        if self.has_plugin(name):
            raise PluginError(
                f"plugin name {name!r} from {origin} is already taken by {self.origins.get(name, '?')}"
            )
        try:
            self.register(plugin, name=name)
            self.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.has_plugin(name):
                self.unregister(name=name)
            raise PluginError(f"plugin {name!r} from {origin} is invalid: {exc}") from None
        self.origins[name] = origin
        self._action_types = None
        self._source_types = None


class _BuiltinSource:
    """A built-in source module, imported only when source types are collected: `spop listen`
    never runs a source, and these modules bring aiohttp (a fifth of a second of each start)."""

    def __init__(self, module: str) -> None:
        self.module = module

    @hookspecs.hookimpl
    def register_sources(self, register: Callable[..., None]) -> None:
        importlib.import_module(self.module).register_sources(register)


def build_plugin_manager(
    plugin_dirs: Iterable[str | Path] = (), *, entry_points: bool = True
) -> PluginManager:
    """A fresh manager with the built-ins, the installed entry points and the folders' modules."""
    pm = PluginManager()
    for action in BUILTIN_ACTIONS:
        module = importlib.import_module(f"{__package__}.actions.{action}")
        pm.add_plugin(module, f"spop_cli.actions.{action}", BUILTIN)
    for source in BUILTIN_SOURCES:
        name = f"{__package__}.sources.{source}"
        pm.add_plugin(_BuiltinSource(name), name, BUILTIN)
    if entry_points:
        load_entry_points(pm)
    for directory in plugin_dirs:
        load_plugin_dir(pm, Path(directory))
    return pm


_managers: dict[tuple[str, ...], PluginManager] = {}


def get_plugin_manager(plugin_dirs: Iterable[str | Path] = ()) -> PluginManager:
    """The process's plugin manager for these folders, built on first use."""
    key = tuple(str(Path(d).expanduser().resolve()) for d in plugin_dirs)
    if key not in _managers:
        _managers[key] = build_plugin_manager(key)
    return _managers[key]


def load_entry_points(pm: PluginManager, group: str = ENTRY_POINT_GROUP) -> None:
    for entry_point in entry_points(group=group):
        dist = entry_point.dist.name if entry_point.dist is not None else "unknown distribution"
        origin = f"entry point {dist}"
        try:
            plugin = entry_point.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {entry_point.name!r} ({origin}, {entry_point.value}) failed to import: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        pm.add_plugin(plugin, entry_point.name, origin)


def load_plugin_dir(pm: PluginManager, directory: Path) -> None:
    """Every `*.py` in the folder (not `_*.py`), in name order."""
    directory = directory.expanduser()
    if not directory.is_dir():
        raise PluginError(f"plugin folder {directory} does not exist")
    for path in sorted(directory.glob("*.py")):
        if not path.name.startswith("_"):
            load_plugin_file(pm, path)


def load_plugin_file(pm: PluginManager, path: Path) -> None:
    """Import one plugin module by its path and register it under its file name."""
    path = path.expanduser().resolve()
    if path in pm.loaded_files:
        return
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    module_name = f"spop_plugins.{path.stem}_{digest}"  # unique even for same-named files
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PluginError(f"plugin file {path} failed to import: {_where(exc, path)}") from None
    pm.add_plugin(module, path.stem, str(path))
    pm.loaded_files[path] = path.stem


def _where(exc: BaseException, path: Path) -> str:
    """`line 3: NameError: …`, the line in the plugin file rather than a traceback."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"line {exc.lineno}: SyntaxError: {exc.msg}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    line = f"line {frames[-1].lineno}: " if frames else ""
    return f"{line}{type(exc).__name__}: {exc}"


def _collect(pm: PluginManager, hook: str, kind: str, make: Callable[..., Any]) -> dict[str, Any]:
    """Call each implementation of a `register_*` hook in turn, so every registration knows its
    plugin; the same name registered twice is a PluginError naming both plugins."""
    types: dict[str, Any] = {}
    for impl in getattr(pm.hook, hook).get_hookimpls():
        origin = pm.origins.get(impl.plugin_name, "?")

        def register(name: str, factory: Any, *args: Any, _impl=impl, _origin=origin) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(
                    f"plugin {_impl.plugin_name!r} ({_origin}) registered {kind} with no name"
                )
            if name in types:
                raise PluginError(
                    f"{kind} {name!r} is registered twice: by {types[name].plugin_name} ({types[name].origin}) "
                    f"and by {_impl.plugin_name} ({_origin})"
                )
            types[name] = make(name, factory, _impl.plugin_name, _origin, *args)

        try:
            impl.function(**{arg: register for arg in impl.argnames if arg == "register"})
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name!r} ({origin}) failed in {hook}: {type(exc).__name__}: {exc}"
            ) from None
    return types


def action_types(pm: PluginManager) -> dict[str, ActionType]:
    """Every registered action type by name; the same name registered twice is a PluginError."""
    if pm._action_types is None:
        pm._action_types = _collect(pm, "register_actions", "action", ActionType)
    return pm._action_types


def source_types(pm: PluginManager) -> dict[str, SourceType]:
    """Every registered source type by name (`register(name, factory, description="")`)."""
    if pm._source_types is None:
        pm._source_types = _collect(pm, "register_sources", "source", SourceType)
    return pm._source_types


def list_plugins(pm: PluginManager) -> list[PluginInfo]:
    """Every plugin with its origin, the hooks it implements and the action types it registered."""
    types = action_types(pm)
    sources = source_types(pm)
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        actions = sorted(t.name for t in types.values() if t.plugin_name == name)
        own_sources = sorted(t.name for t in sources.values() if t.plugin_name == name)
        infos.append(PluginInfo(name, pm.origins.get(name, "?"), hooks, actions, own_sources))
    return infos
