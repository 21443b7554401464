"""The vendor's object model: names, contact data, events."""

from __future__ import annotations

import pytest

from spop_cli import (
    ContactDataCollection,
    Error,
    ListenerStatus,
    ScreenPopError,
)
from spop_cli.model import (
    EVENT_CLASSES,
    MEDIA_FIELDS,
    Media,
    ScreenPopCallbackEvent,
    ScreenPopEmailEvent,
    ScreenPopEvent,
    ScreenPopTelephoneEvent,
    ScreenPopWebCollaborationEvent,
)

VENDOR_STATUSES = [
    "Status_Down",
    "Status_Idle",
    "Status_Up",
    "Status_Reconnecting",
    "Status_Unknown",
]
VENDOR_ERRORS = [
    "SCREENPOP_Already_Registered",
    "SCREENPOP_Cannot_Create_Diags",
    "SCREENPOP_Cannot_Find_HiPath_ProCenter",
    "SCREENPOP_Cannot_Register",
    "SCREENPOP_Framework_Error",
    "SCREENPOP_Initialization_Error",
    "SCREENPOP_Memory_Allocation_Error",
    "SCREENPOP_Wrong_Key",
    "SCREENPOP_Wrong_Status",
]


@pytest.mark.parametrize("name", VENDOR_STATUSES)
def test_listener_status_keeps_vendor_names(name: str) -> None:
    assert getattr(ListenerStatus, name).value == name
    assert str(getattr(ListenerStatus, name)) == name


@pytest.mark.parametrize("name", VENDOR_ERRORS)
def test_error_keeps_vendor_names(name: str) -> None:
    error = ScreenPopError(getattr(Error, name), "detail")
    assert error.code is getattr(Error, name)
    assert name in str(error)


def test_enumerations_are_complete() -> None:
    assert [s.value for s in ListenerStatus] == VENDOR_STATUSES
    assert sorted(e.value for e in Error) == sorted(VENDOR_ERRORS)


def test_contact_data_is_ordered_iterable_sized_and_keyed() -> None:
    data = ContactDataCollection([("code1", "chaîne1"), ("b", "2"), ("a", "1")])
    assert len(data) == 3
    assert [(item.key, item.value) for item in data] == [
        ("code1", "chaîne1"),
        ("b", "2"),
        ("a", "1"),
    ]
    assert data["code1"] == "chaîne1"
    assert data.item("b").value == "2"
    assert "a" in data and "zz" not in data


def test_contact_data_missing_key_raises_wrong_key() -> None:
    data = ContactDataCollection({"code1": "chaîne1"})
    with pytest.raises(ScreenPopError) as info:
        data["nope"]
    assert info.value.code is Error.SCREENPOP_Wrong_Key
    assert "nope" in info.value.message


def test_contact_data_items_are_read_only() -> None:
    item = next(iter(ContactDataCollection({"k": "v"})))
    with pytest.raises(AttributeError):
        item.key = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "media, cls",
    [
        (Media.telephone, ScreenPopTelephoneEvent),
        (Media.callback, ScreenPopCallbackEvent),
        (Media.email, ScreenPopEmailEvent),
        (Media.webcollab, ScreenPopWebCollaborationEvent),
    ],
)
def test_each_media_has_its_event_class(media: Media, cls: type) -> None:
    assert EVENT_CLASSES[media] is cls
    event = ScreenPopEvent.from_dict({"media": media.value, "resource": "r1", "wait_time": 7})
    assert type(event) is cls
    assert event.wait_time == 7 and event.resource == "r1"


def test_event_round_trips_with_snake_case_and_from() -> None:
    wire = {
        "id": "p1",
        "media": "telephone",
        "resource": "54321",
        "contact_id": "c1",
        "created_at": "2026-01-01T00:00:00.000Z",
        "source": "12345",
        "destination": "2468",
        "queue_name": "File d'attente des ventes",
        "contact_description": "Ventes",
        "from": "13579",
        "redirect": "",
        "wait_time": 15,
        "contact_data": {"code1": "chaîne1"},
    }
    event = ScreenPopEvent.from_dict(wire)
    assert event.from_ == "13579" and event.extension == "54321"
    assert event.to_dict() == wire


def test_text_fields_are_never_null() -> None:
    event = ScreenPopEvent.from_dict({"media": "email", "resource": "u", "source": None})
    assert all(value is not None for value in event.to_dict().values())
    assert event.source == ""


def test_media_fields_match_the_guide() -> None:
    assert MEDIA_FIELDS[Media.callback] == ("destination", "queue_name", "contact_description")
    assert "redirect" in MEDIA_FIELDS[Media.telephone] and "from" in MEDIA_FIELDS[Media.telephone]
    assert "redirect" not in MEDIA_FIELDS[Media.email]


def test_unknown_media_names_the_choices() -> None:
    with pytest.raises(ScreenPopError) as info:
        Media.parse("fax")
    assert "telephone" in info.value.message


def test_contact_data_of_strings_and_of_other_values_alike() -> None:
    from spop_cli.model import ContactDataCollection

    plain = ContactDataCollection({"b": "2", "a": "1"})
    mixed = ContactDataCollection({"b": 2, "a": None})
    assert plain.pairs() == (("b", "2"), ("a", "1"))
    assert mixed.pairs() == (("b", "2"), ("a", ""))
    assert [(i.key, i.value) for i in plain] == list(plain.pairs())
    source = {"k": "v"}
    copied = ContactDataCollection(source)
    source["k"] = "changed"
    assert copied["k"] == "v"  # a copy, not the caller's dict


@pytest.mark.parametrize("word", ["telephone", " TELEPHONE ", "Telephone"])
def test_from_dict_takes_the_media_word_in_any_case(word: str) -> None:
    event = ScreenPopEvent.from_dict({"media": word, "resource": "6000"})
    assert event.media is Media.telephone and type(event).__name__ == "ScreenPopTelephoneEvent"


def test_utc_now_iso_is_now_to_the_millisecond() -> None:
    import re
    import time
    from datetime import UTC, datetime

    from spop_cli.model import utc_now_iso

    for _ in range(2000):  # across several milliseconds, and likely a second's edge or two
        before = time.time_ns() // 1_000_000
        text = utc_now_iso()
        after = time.time_ns() // 1_000_000
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert moment.tzinfo is not None and moment.utcoffset().total_seconds() == 0
        at = round(moment.timestamp() * 1000)
        assert before <= at <= after
        assert text == datetime.fromtimestamp(at / 1000, UTC).isoformat(
            timespec="milliseconds"
        ).replace("+00:00", "Z")


ALL_TEXT = {
    "source": "s",
    "destination": "d",
    "queue_name": "q",
    "contact_description": "c",
    "from": "f",
    "redirect": "r",
}


@pytest.mark.parametrize(
    ("media", "carried"),
    [
        ("telephone", {"source", "destination", "queue_name", "contact_description", "from", "redirect"}),
        ("callback", {"destination", "queue_name", "contact_description"}),
        ("email", {"source", "destination", "queue_name", "contact_description"}),
        ("webcollab", {"source", "destination", "queue_name", "contact_description"}),
    ],
)  # fmt: skip
@pytest.mark.parametrize("path", ["plain", "checked"])
def test_a_pop_carries_only_its_medias_fields_the_others_empty(
    media: str, carried: set[str], path: str
) -> None:
    """protocol.md: "Fields a media does not have (e.g. `redirect` for email) are empty" (the
    guide's chapter 3). A pop posted with them kept them (an outside check)."""
    from spop_cli.pops import normalize_pop

    spelled = media if path == "plain" else media.upper()  # the field-by-field path
    pop = normalize_pop({"media": spelled, "resource": "13579", **ALL_TEXT})
    assert {name: pop[name] for name in ALL_TEXT} == {
        name: (value if name in carried else "") for name, value in ALL_TEXT.items()
    }
