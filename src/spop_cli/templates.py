"""How configuration refers to a pop's fields: `{field}` templates and `when` glob filters. Pure.

A template may only name a field (`{source}`) or a contact-data key (`{contact_data[code1]}`);
`{{` and `}}` are literal braces. No attribute access, no indexing, no format specs or
conversions: a pop's values are data, never code, and a bad template fails when the
configuration is checked, not when a call arrives.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .model import TEXT_FIELDS

# Every field a template or filter may name: the pop's JSON form minus contact_data.
FIELDS: tuple[str, ...] = (
    "id",
    "media",
    "resource",
    "contact_id",
    "created_at",
    *TEXT_FIELDS,
    "wait_time",
    # a contact change's (empty on a pop): docs/configuration.md "Actions per trigger"
    "change",
    "pop_id",
    "at",
    "answered_by",
    "transferred_to",
    "consulted",
    "talk_time",
    "reason",
)
DATA_PREFIX = "contact_data."
_DATA_FIELD = re.compile(r"contact_data\[([^\[\]{}]+)\]")


class TemplateError(ValueError):
    """A template or filter that names something a pop does not have, or uses unsupported syntax."""


@dataclass(frozen=True, slots=True)
class FieldRef:
    """One substitution: a field name, or a contact-data key when `data_key` is set."""

    name: str
    data_key: str | None = None

    def value(self, fields: Mapping[str, Any]) -> str:
        if self.data_key is not None:
            # A missing key renders empty, like any text field that is not set (docs/configuration.md, templates).
            return str((fields.get("contact_data") or {}).get(self.data_key, ""))
        return str(fields.get(self.name, ""))


def pop_fields(pop: Any) -> Mapping[str, Any]:
    """The flat mapping templates read: a ScreenPopEvent's JSON form, or a mapping as is."""
    if isinstance(pop, Mapping):
        return pop
    return pop.to_dict()


def parse_field(name: str) -> FieldRef:
    """`source` → FieldRef; `contact_data[KEY]` → a data-key FieldRef; anything else raises."""
    if name in FIELDS:
        return FieldRef(name)
    match = _DATA_FIELD.fullmatch(name)
    if match:
        return FieldRef("contact_data", match.group(1))
    raise TemplateError(
        f"unknown field {{{name}}} (use {{FIELD}} or {{contact_data[KEY]}}; fields: {', '.join(FIELDS)})"
    )


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal strings and FieldRefs, in order."""

    text: str
    parts: tuple[str | FieldRef, ...]

    @property
    def fields(self) -> list[FieldRef]:
        return [part for part in self.parts if isinstance(part, FieldRef)]

    @property
    def is_literal(self) -> bool:
        return not self.fields

    def render(self, pop: Any, quote: Callable[[str], str] | None = None) -> str:
        """Fill every field from the pop; `quote` (e.g. URL encoding) applies to values only."""
        fields = pop_fields(pop)
        out = []
        for part in self.parts:
            if isinstance(part, FieldRef):
                value = part.value(fields)
                out.append(quote(value) if quote else value)
            else:
                out.append(part)
        return "".join(out)


def parse_template(text: str) -> Template:
    """Parse `text` once; raise TemplateError naming the position and what is wrong."""
    if not isinstance(text, str):
        raise TemplateError(f"a template must be a string, not {type(text).__name__}")
    parts: list[str | FieldRef] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "{" and text.startswith("{{", i):
            literal.append("{")
            i += 2
        elif char == "{":
            end = text.find("}", i)
            if end < 0:
                raise TemplateError(f"unclosed '{{' at position {i}")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(parse_field(text[i + 1 : end]))
            i = end + 1
        elif char == "}" and text.startswith("}}", i):
            literal.append("}")
            i += 2
        elif char == "}":
            raise TemplateError(f"single '}}' at position {i} (write '}}}}' for a literal brace)")
        else:
            literal.append(char)
            i += 1
    if literal:
        parts.append("".join(literal))
    return Template(text, tuple(parts))


@dataclass(frozen=True, slots=True)
class Condition:
    """A `when` table: every named field must match one of its globs (fnmatch, case-sensitive)."""

    globs: tuple[tuple[FieldRef, str, tuple[str, ...]], ...]  # (field, key as written, patterns)

    def mismatch(self, pop: Any) -> str | None:
        """None when the pop matches; else why not, for the log."""
        fields = pop_fields(pop)
        for ref, key, patterns in self.globs:
            value = ref.value(fields)
            if not any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns):
                wanted = " or ".join(repr(p) for p in patterns)
                return f"{key} {value!r} does not match {wanted}"
        return None

    def matches(self, pop: Any) -> bool:
        return self.mismatch(pop) is None


def parse_condition(table: Any) -> Condition:
    """`{queue_name = "Ventes*", "contact_data.code1" = ["A*", "B*"]}` → Condition."""
    if not isinstance(table, Mapping):
        raise TemplateError(f"'when' must be a table of field = glob, not {type(table).__name__}")
    globs = []
    for key, patterns in _flatten_data_keys(table):
        if key.startswith(DATA_PREFIX) and len(key) > len(DATA_PREFIX):
            ref = FieldRef("contact_data", key[len(DATA_PREFIX) :])
        elif key in FIELDS:
            ref = FieldRef(key)
        else:
            raise TemplateError(
                f"unknown field {key!r} in 'when' (fields: {', '.join(FIELDS)}, or contact_data.KEY)"
            )
        if isinstance(patterns, str):
            patterns = [patterns]
        if (
            not isinstance(patterns, list)
            or not patterns
            or not all(isinstance(p, str) for p in patterns)
        ):
            raise TemplateError(f"when.{key} must be a glob string or a list of glob strings")
        globs.append((ref, key, tuple(patterns)))
    return Condition(tuple(globs))


def _flatten_data_keys(table: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """TOML reads `contact_data.code1 = "A*"` as a nested table; make it `contact_data.code1` again."""
    items = []
    for key, value in table.items():
        if key == "contact_data" and isinstance(value, Mapping):
            items.extend((f"{DATA_PREFIX}{sub}", globs) for sub, globs in value.items())
        else:
            items.append((key, value))
    return items
