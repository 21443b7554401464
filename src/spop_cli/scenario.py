"""Scenario files: contact lifecycle events spaced in time, with the pops they should produce.

Builtins live in `spop_cli/scenarios/*.toml`; `spop simulate` plays `timeline()` to a hub.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from .model import TEXT_FIELDS

TOP_KEYS = {"description", "events", "expect"}
POP_TEXT_KEYS = ("contact_id", "media", "resource", *TEXT_FIELDS)
EXPECT_KEYS = {*POP_TEXT_KEYS, "wait_time", "contact_data"}


@dataclass
class Scenario:
    """A named list of (seconds after the previous event, event) and the pops expected."""

    name: str
    description: str
    events: list[tuple[float, dict[str, Any]]]
    expect: list[dict[str, Any]]


def _builtin_dir() -> Traversable:
    return resources.files("spop_cli").joinpath("scenarios")


def builtin_names() -> list[str]:
    """Names of the scenarios shipped with spop, sorted."""
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in _builtin_dir().iterdir()
        if entry.name.endswith(".toml")
    )


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A builtin by name, or a TOML file by path; ValueError names the file and key at fault."""
    text = str(name_or_path)
    if not isinstance(name_or_path, Path) and text in builtin_names():
        entry = _builtin_dir().joinpath(f"{text}.toml")
        return _parse(text, f"builtin scenario {text}", entry.read_text(encoding="utf-8"))
    path = Path(name_or_path)
    if not path.is_file():
        names = ", ".join(builtin_names())
        raise ValueError(f"{text}: no such scenario file or builtin scenario (builtins: {names})")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    return _parse(path.stem, str(path), content)


def timeline(scenario: Scenario, start: datetime, contact_suffix: str = "") -> list[dict[str, Any]]:
    """The events with absolute `at` times (ISO 8601, Z) from the cumulative `after`.

    `contact_suffix` is appended to every contact_id, so replays do not meet earlier contacts.
    """
    moment = start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)
    played: list[dict[str, Any]] = []
    for after, event in scenario.events:
        moment += timedelta(seconds=after)
        at = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        played.append({**event, "contact_id": event["contact_id"] + contact_suffix, "at": at})
    return played


def _parse(name: str, origin: str, content: str) -> Scenario:
    try:
        document = tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{origin}: not valid TOML: {exc}") from None
    for key in document:
        if key not in TOP_KEYS:
            raise ValueError(
                f"{origin}: {key}: unknown key (expected {', '.join(sorted(TOP_KEYS))})"
            )
    description = document.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{origin}: description: must be a string")
    raw_events = _tables(origin, document, "events")
    if not raw_events:
        raise ValueError(f"{origin}: events: at least one [[events]] table is required")
    events = [_event(f"{origin}: events[{i}]", raw) for i, raw in enumerate(raw_events)]
    expect = [
        _expect(f"{origin}: expect[{i}]", raw)
        for i, raw in enumerate(_tables(origin, document, "expect"))
    ]
    return Scenario(name, description, events, expect)


def _tables(origin: str, document: dict[str, Any], key: str) -> list[dict[str, Any]]:
    tables = document.get(key, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{origin}: {key}: must be an array of tables ([[{key}]])")
    return tables


def _event(where: str, raw: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    after = raw.get("after", 0)
    if isinstance(after, bool) or not isinstance(after, int | float) or not after >= 0:
        raise ValueError(f"{where}.after: must be a number of seconds >= 0, not {after!r}")
    if "at" in raw:
        raise ValueError(f"{where}.at: scenario events are timed by `after`, not `at`")
    for key in ("contact_id", "event"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"{where}.{key}: required, a non-empty string")
    event = {key: value for key, value in raw.items() if key != "after"}
    for key, value in event.items():
        _check_value(f"{where}.{key}", key, value)
    return float(after), event


def _expect(where: str, raw: dict[str, Any]) -> dict[str, Any]:
    for key, value in raw.items():
        if key not in EXPECT_KEYS:
            raise ValueError(f"{where}.{key}: not a pop field")
        if key == "wait_time":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}.wait_time: must be an integer")
        else:
            _check_value(f"{where}.{key}", key, value)
    return dict(raw)


def _check_value(where: str, key: str, value: Any) -> None:
    if key == "contact_data":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f'{where}: must be an inline table of strings, e.g. {{ code1 = "x" }}')
    elif not isinstance(value, str):
        raise ValueError(f"{where}: must be a string, not {type(value).__name__}")
