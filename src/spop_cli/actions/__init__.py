"""What an action is, how a config table becomes one, and the built-in action plugins beside it.

An action type is registered by a plugin through the `register_actions(register)` hook:
`register(name, factory)`. The factory takes the action's table from the configuration
(`[actions.NAME]`, less the `plugin` and `when` keys) and returns an action object:

    class Beep:
        name = "beep"                    # shown in logs and the live view
        timeout = 5.0                    # optional: seconds the dispatcher waits for run()
        def run(self, pop): ...          # or `async def run(self, pop)`; raise to report a failure
        def close(self): ...             # optional: release files or sessions at exit
        warnings = [("argv[1]", "…")]    # optional: (key, message) pairs for risky but valid options

A sync `run` is called in a thread of its own, an async one on the event loop; either way a slow
or hanging action delays nobody else. Raise `ActionSkipped` to report a skip, anything else (best an
`ActionError` with a readable message) to report a failure. A factory validates its table and raises
`ActionConfigError(key, message)`, so `spop config check` can name the key at fault before any pop;
`warnings` are printed by the check without failing it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..model import CHANGE_KINDS
from ..templates import Condition, TemplateError, parse_condition

if TYPE_CHECKING:  # pragma: no cover
    from ..plugins import ActionType

GENERIC_KEYS = frozenset({"plugin", "when", "timeout", "on"})  # understood for every action type
DEFAULT_TIMEOUT = 30.0
# What may trigger an action (`on`): the pop, and each contact change (docs/configuration.md).
TRIGGERS = ("pop", *CHANGE_KINDS)
DEFAULT_ON = frozenset({"pop"})  # a table without `on` means what it always meant


class Action(Protocol):
    name: str

    def run(self, pop: Any) -> Any: ...


class ActionError(Exception):
    """An action failed; the message is what the operator sees."""


class ActionSkipped(Exception):
    """The action chose not to run for this pop (the message says why)."""


class ActionConfigError(ValueError):
    """A bad option in an action's table; `key` names it (e.g. `url`, `argv[0]`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def check_keys(table: Mapping[str, Any], allowed: set[str] | frozenset[str]) -> None:
    """Reject keys the action does not know, so a typo is not silently ignored."""
    for key in table:
        if key not in allowed and key not in GENERIC_KEYS:
            known = ", ".join(sorted(set(allowed) | GENERIC_KEYS))
            raise ActionConfigError(key, f"unknown key (expected one of {known})")


def option(
    table: Mapping[str, Any],
    key: str,
    kinds: type | tuple[type, ...],
    default: Any = None,
    *,
    required: bool = False,
) -> Any:
    """Read one option of the expected type, or raise ActionConfigError naming it."""
    if key not in table:
        if required:
            raise ActionConfigError(key, "is required")
        return default
    value = table[key]
    kinds_tuple = kinds if isinstance(kinds, tuple) else (kinds,)
    # TOML booleans are ints to Python; a number option must not accept true/false.
    if isinstance(value, bool) and bool not in kinds_tuple:
        value_ok = False
    else:
        value_ok = isinstance(value, kinds_tuple)
    if not value_ok:
        names = " or ".join(_type_word(kind) for kind in kinds_tuple)
        raise ActionConfigError(key, f"must be {names}, not {_type_word(type(value))}")
    return value


def positive_seconds(table: Mapping[str, Any], key: str, default: float) -> float:
    value = option(table, key, (int, float), default)
    if value <= 0:
        raise ActionConfigError(key, "must be a positive number of seconds")
    return float(value)


def stream_option(table: Mapping[str, Any], key: str = "stream") -> Callable[[], Any]:
    """`"stdout"` (default), `"stderr"`, or (from Python) a file object; looked up at each pop.

    Looking sys.stdout up late lets a live view that redirects it show the action's output.
    """
    value = table.get(key, "stdout")
    if value in ("stdout", "stderr"):
        return lambda: getattr(sys, value)
    if hasattr(value, "write"):
        return lambda: value
    raise ActionConfigError(key, 'must be "stdout" or "stderr"')


def _type_word(kind: type) -> str:
    return {str: "a string", bool: "true or false", int: "an integer", float: "a number"}.get(
        kind, {list: "a list", dict: "a table"}.get(kind, kind.__name__)
    )


@dataclass(frozen=True)
class ConfiguredAction:
    """An action built from its table: the object, its type, its `when` filter and time limit."""

    name: str  # as configured: `crm` in [actions.crm]
    type: str  # the registered action type: `url`
    action: Any
    when: Condition | None = None
    timeout: float = DEFAULT_TIMEOUT
    on: frozenset[str] = DEFAULT_ON  # the triggers it runs on: "pop" and/or change names


def configure_action(
    types: Mapping[str, ActionType], name: str, table: Mapping[str, Any] | None = None
) -> ConfiguredAction:
    """Build the action `name` from its table; `plugin` defaults to the name itself.

    Raises ActionConfigError naming the key at fault (`plugin`, `when`, `timeout` or the type's own).
    """
    table = dict(table or {})
    type_name = table.pop("plugin", name)
    if not isinstance(type_name, str) or type_name not in types:
        known = ", ".join(sorted(types)) or "none"
        raise ActionConfigError("plugin", f"unknown action plugin (known: {known})")
    when = None
    if "when" in table:
        try:
            when = parse_condition(table.pop("when"))
        except TemplateError as exc:
            raise ActionConfigError("when", str(exc)) from None
    on = parse_on(table.pop("on")) if "on" in table else DEFAULT_ON
    if "timeout" in table:
        positive_seconds(table, "timeout", DEFAULT_TIMEOUT)
    action = types[type_name].factory(table)
    # The action knows best (the command action waits a little longer than its own kill);
    # else the table's timeout; else the default.
    timeout = getattr(action, "timeout", None) or table.get("timeout") or DEFAULT_TIMEOUT
    return ConfiguredAction(name, type_name, action, when, float(timeout), on)


def parse_on(value: Any) -> frozenset[str]:
    """`on = ["pop", "ended"]` (or one string) → the triggers; ActionConfigError("on") if wrong."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise ActionConfigError("on", 'must be a non-empty list of triggers, e.g. ["pop", "ended"]')
    for item in items:
        if item not in TRIGGERS:
            raise ActionConfigError(
                "on", f"unknown trigger {item[:64]!r} (expected one of {', '.join(TRIGGERS)})"
            )
    return frozenset(items)
