"""Templates and `when` filters: only fields and contact-data keys, values are data, errors at parse time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guide_pops import guide_pop
from spop_cli.templates import (
    FIELDS,
    TemplateError,
    parse_condition,
    parse_template,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{source}", "12345"),
        ("call from {source} to {destination}", "call from 12345 to 2468"),
        ("{queue_name}", "File d'attente des ventes"),
        ("{wait_time}", "10"),
        ("{from}|{redirect}", "|"),
        ("{contact_data[code1]}", "chaîne1"),
        ("{contact_data[missing]}", ""),
        ("{{source}}", "{source}"),
        ("}}{{", "}{"),
        ("{media}/{resource}", "telephone/13579"),
        ("", ""),
        ("no fields", "no fields"),
    ],
)
def test_render(text: str, expected: str) -> None:
    assert parse_template(text).render(guide_pop()) == expected


def test_render_takes_a_mapping_too() -> None:
    assert parse_template("{source}").render({"source": "x"}) == "x"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{sourc}", "unknown field {sourc}"),
        ("{source.__class__}", "unknown field"),
        ("{source[0]}", "unknown field"),
        ("{source:>10}", "unknown field"),
        ("{source!r}", "unknown field"),
        ("{contact_data}", "unknown field"),
        ("{contact_data[]}", "unknown field"),
        ("{contact_data[a][b]}", "unknown field"),
        ("{}", "unknown field"),
        ("{0}", "unknown field"),
        ("{source", "unclosed '{' at position 0"),
        ("a } b", "single '}' at position 2"),
    ],
)
def test_bad_templates_fail_at_parse_time(text: str, fragment: str) -> None:
    with pytest.raises(TemplateError, match=None) as caught:
        parse_template(text)
    assert fragment in str(caught.value)


def test_quote_applies_to_values_only() -> None:
    template = parse_template("https://x/?q={source}&d={contact_data[code1]}")
    assert template.render(guide_pop(source="a&b"), quote=lambda v: v.upper()) == (
        "https://x/?q=A&B&d=CHAÎNE1"
    )


def test_fields_and_literal() -> None:
    template = parse_template("{source} {contact_data[k]}")
    assert [(f.name, f.data_key) for f in template.fields] == [
        ("source", None),
        ("contact_data", "k"),
    ]
    assert not template.is_literal
    assert parse_template("/usr/bin/x").is_literal


@given(st.text())
def test_parsing_any_text_raises_template_error_or_nothing(text: str) -> None:
    try:
        parse_template(text)
    except TemplateError:
        pass


@given(st.text().filter(lambda t: "{" not in t and "}" not in t))
def test_text_without_braces_renders_as_itself(text: str) -> None:
    assert parse_template(text).render(guide_pop()) == text


@given(st.text())
def test_a_value_is_never_parsed_as_a_template(value: str) -> None:
    # A field's value may hold braces; it is substituted as data, not parsed again.
    assert parse_template("<{source}>").render(guide_pop(source=value)) == f"<{value}>"


@pytest.mark.parametrize(
    ("when", "matches"),
    [
        ({"queue_name": "File*"}, True),
        ({"queue_name": "Ventes*"}, False),
        ({"queue_name": ["Support*", "File*"]}, True),
        ({"queue_name": "File*", "source": "1*"}, True),
        ({"queue_name": "File*", "source": "9*"}, False),
        ({"contact_data.code1": "cha*"}, True),
        ({"contact_data": {"code1": "x*"}}, False),  # TOML's dotted key form
        ({"contact_data.nope": "*"}, True),  # a missing key is the empty string
        ({"contact_data.nope": "?*"}, False),
        ({"wait_time": "1?"}, True),
        ({"queue_name": "file*"}, False),  # case-sensitive on every platform
    ],
)
def test_when(when: dict, matches: bool) -> None:
    assert parse_condition(when).matches(guide_pop()) is matches


def test_when_says_why_it_does_not_match() -> None:
    why = parse_condition({"queue_name": "Ventes*"}).mismatch(guide_pop())
    assert why == "queue_name \"File d'attente des ventes\" does not match 'Ventes*'"


@pytest.mark.parametrize(
    ("when", "fragment"),
    [
        ({"queue": "x"}, "unknown field 'queue'"),
        ({"queue_name": 3}, "when.queue_name must be a glob string"),
        ({"queue_name": []}, "when.queue_name must be a glob string"),
        ("queue_name", "'when' must be a table"),
    ],
)
def test_bad_when(when: object, fragment: str) -> None:
    with pytest.raises(TemplateError) as caught:
        parse_condition(when)
    assert fragment in str(caught.value)


def test_every_field_is_in_the_pop_json_or_a_change() -> None:
    from spop_cli.hub.contacts import Change

    change = Change("i", "c", "telephone", "1", "p", "ended", "t").to_dict()
    assert set(FIELDS) == (set(guide_pop().to_dict()) | set(change)) - {"contact_data"}
