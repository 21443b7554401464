"""AMI framing: whole messages out whatever the splits, malformed lines reported and skipped,
nothing lost after garbage, and a fuzzed stream never raises."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fake_ami import fixture_dir
from spop_cli.sources.ami_parser import MAX_MESSAGE, AmiParser, encode_action

RAW = (fixture_dir() / "transcript.ami").read_bytes()
WHOLE = AmiParser().feed(RAW)


def parse_in_pieces(data: bytes, cuts: list[int]) -> tuple[AmiParser, list[dict[str, str]]]:
    parser = AmiParser()
    out: list[dict[str, str]] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out.extend(parser.feed(data[start:cut]))
        start = cut
    return parser, out


def test_the_recording_parses_to_its_1142_events_and_the_login_answer() -> None:
    parser = AmiParser()
    messages = parser.feed(RAW)
    assert parser.banner == "Asterisk Call Manager/11.0.0"
    assert len(messages) == 1143
    assert messages[0] == {
        "Response": "Success",
        "ActionID": "tap",
        "Message": "Authentication accepted",
    }
    assert sum(1 for m in messages if "Event" in m) == 1142
    assert parser.malformed == []


def test_every_byte_boundary_of_a_message_gives_the_same_message() -> None:
    data = b"Asterisk Call Manager/11.0.0\r\nEvent: Hangup\r\nUniqueid: 1.2\r\nCause-txt: Normal Clearing\r\n\r\n"
    for cut in range(len(data) + 1):
        _, out = parse_in_pieces(data, [cut])
        assert out == [{"Event": "Hangup", "Uniqueid": "1.2", "Cause-txt": "Normal Clearing"}], cut


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RAW)), max_size=400))
def test_the_recording_split_anywhere_gives_the_same_messages(cuts: list[int]) -> None:
    _, out = parse_in_pieces(RAW, cuts)
    assert out == WHOLE


def test_a_malformed_line_is_reported_and_the_message_kept() -> None:
    parser = AmiParser()
    out = parser.feed(b"Event: Hangup\r\nthis is no header\r\n: no name\r\nUniqueid: 7.7\r\n\r\n")
    assert out == [{"Event": "Hangup", "Uniqueid": "7.7"}]
    assert [(m.reason, m.line) for m in parser.take_malformed()] == [
        ("not a 'Key: Value' line", b"this is no header"),
        ("not a 'Key: Value' line", b": no name"),
    ]
    assert parser.take_malformed() == []


def test_no_banner_and_empty_values_and_values_with_colons() -> None:
    out = AmiParser().feed(b"Event: VarSet\r\nValue: \r\nAppData: a:b: c\r\n\r\n")
    assert out == [{"Event": "VarSet", "Value": "", "AppData": "a:b: c"}]


def test_a_repeated_header_keeps_every_value() -> None:
    out = AmiParser().feed(
        b"Event: X\r\nChanVariable: A=1\r\nChanVariable: B=2\r\nChanVariable: C=3\r\n\r\n"
    )
    assert out == [
        {"Event": "X", "ChanVariable": "A=1", "ChanVariable#2": "B=2", "ChanVariable#3": "C=3"}
    ]


def test_a_message_over_the_limit_is_dropped_and_the_next_one_read() -> None:
    parser = AmiParser()
    huge = b"Event: Huge\r\nData: " + b"x" * (MAX_MESSAGE + 10)
    out = parser.feed(huge[: MAX_MESSAGE // 2])
    out += parser.feed(huge[MAX_MESSAGE // 2 :])
    out += parser.feed(b"\r\n\r\nEvent: Hangup\r\nUniqueid: 1\r\n\r\n")
    assert out == [{"Event": "Hangup", "Uniqueid": "1"}]
    assert [m.reason for m in parser.take_malformed()] == [
        f"message over {MAX_MESSAGE} bytes dropped"
    ]
    assert len(parser._buffer) == 0


def test_just_under_the_limit_is_kept() -> None:
    body = b"Event: Big\r\nData: " + b"y" * (MAX_MESSAGE - 30)
    assert len(body) <= MAX_MESSAGE
    parser = AmiParser()
    out = parser.feed(body) + parser.feed(b"\r\n\r\n")
    assert out == [{"Event": "Big", "Data": "y" * (MAX_MESSAGE - 30)}]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    out = AmiParser().feed(b"Event: UserEvent\r\nCallerIDName: Ren\xe9\r\n\r\n")
    assert out == [{"Event": "UserEvent", "CallerIDName": "Ren\ufffd"}]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_fuzz_never_raises_and_reads_on_after_garbage(garbage: bytes, cuts: list[int]) -> None:
    tail = b"\r\n\r\nEvent: Hangup\r\nUniqueid: 9.9\r\n\r\n"
    data = b"Asterisk Call Manager/11.0.0\r\n" + garbage + tail
    parser, out = parse_in_pieces(data, [c for c in cuts if c <= len(data)])
    assert out[-1] == {"Event": "Hangup", "Uniqueid": "9.9"}
    assert all(isinstance(k, str) and isinstance(v, str) for m in out for k, v in m.items())


def test_an_action_cannot_smuggle_a_header_through_a_value() -> None:
    sent = encode_action("Filter", {"ActionID": "1", "Filter": "Event: X\r\nAction: Originate"})
    assert sent == b"Action: Filter\r\nActionID: 1\r\nFilter: Event: X  Action: Originate\r\n\r\n"
