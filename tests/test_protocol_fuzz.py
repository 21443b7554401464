"""The frame decoder, the client-frame checks and the pop checks under arbitrary input.

Whatever the bytes, the decoder returns frames or raises FrameError naming a SCREENPOP code; it
never raises anything else and never holds more than one frame's worth of bytes.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import HubThread
from hubproc import Canary, RawClient, module_hub_fixtures, run
from spop_cli.model import TEXT_FIELDS, Error
from spop_cli.pops import InputError, normalize_pops
from spop_cli.protocol import (
    CLIENT_OPS,
    HUB_OPS,
    MAX_DEPTH,
    MAX_FRAME,
    FrameDecoder,
    FrameError,
    check_client_frame,
    encode,
)

QUICK = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIGHT = settings(QUICK, max_examples=100)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
ops = st.sampled_from(sorted(CLIENT_OPS | HUB_OPS)) | st.text(max_size=10)
frames = st.dictionaries(
    st.sampled_from(["media", "resource", "ref", "id", "ids", "version", "token", "pops"]),
    json_values,
    max_size=5,
).flatmap(lambda d: ops.map(lambda op: {**d, "op": op}))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` split at the given offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


# -- the decoder ------------------------------------------------------------------------------


@QUICK
@given(st.lists(st.binary(max_size=300), max_size=12), st.integers(16, 512))
def test_decoder_never_raises_anything_but_frame_error(chunks: list[bytes], max_frame: int) -> None:
    decoder = FrameDecoder(max_frame)
    for chunk in chunks:
        try:
            out = decoder.feed(chunk)
        except FrameError as exc:
            assert exc.code is Error.SCREENPOP_Framework_Error
            return  # the connection is closed after the first error: the rest is moot
        for frame in out:
            assert isinstance(frame, dict) and isinstance(frame["op"], str)
        assert len(decoder._buffer) <= max_frame  # bounded whatever the peer sends


@LIGHT
@given(st.lists(frames, min_size=1, max_size=5), st.lists(st.integers(0, 10_000), max_size=10))
def test_frames_survive_any_split_into_chunks(sent: list[dict[str, Any]], cuts: list[int]) -> None:
    wire = b"".join(encode(f) for f in sent)
    decoder = FrameDecoder()
    got: list[dict[str, Any]] = []
    for piece in chunked(wire, cuts):
        got += decoder.feed(piece)
    assert got == [orjson.loads(orjson.dumps(f)) for f in sent]


@QUICK
@given(st.binary(min_size=1, max_size=200))
def test_truncated_frame_is_held_not_decoded(tail: bytes) -> None:
    assume(b"\n" not in tail)
    decoder = FrameDecoder()
    assert decoder.feed(b'{"op":"ping"}\n' + tail) == [{"op": "ping"}]
    assert bytes(decoder._buffer) == tail  # waits for the rest; a closed peer just leaves it


@pytest.mark.parametrize("newline", [True, False], ids=["with-newline", "no-newline"])
def test_line_over_the_frame_limit_is_refused(newline: bool) -> None:
    decoder = FrameDecoder()
    line = b'{"op":"ping","x":"' + b"a" * MAX_FRAME + b'"}'
    with pytest.raises(FrameError, match="longer than 65536"):
        for i in range(0, len(line), 4096):
            decoder.feed(line[i : i + 4096])
        decoder.feed(b"\n" if newline else b"")
    assert len(decoder._buffer) == 0


def test_line_at_the_frame_limit_is_accepted() -> None:
    head, tail = b'{"op":"ping","x":"', b'"}'
    line = head + b"a" * (MAX_FRAME - len(head) - len(tail)) + tail
    assert len(line) == MAX_FRAME
    assert FrameDecoder().feed(line + b"\n")[0]["op"] == "ping"


@pytest.mark.parametrize(
    "line, message",
    [
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"op":"hello","client":"\xc3\x28"}', "not valid JSON"),
        (b'{"op":"hello","ref":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper than 64"),
        (b'{"op":"ping","a":' * 65 + b"1" + b"}" * 65, "nested deeper than 64"),
        (b'["op"]', "not a JSON object"),
        (b'"hello"', "not a JSON object"),
        (b"{}", "no string 'op'"),
        (b'{"op": 7}', "no string 'op'"),
        (b'{"op": "hello"', "not valid JSON"),
        (b"NaN", "not valid JSON"),
    ],
    ids=[
        "binary",
        "bad-utf8",
        "deep-array",
        "deep-object",
        "array",
        "string",
        "no-op",
        "int-op",
        "truncated",
        "nan",
    ],
)
def test_bad_lines_name_the_fault(line: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message) as caught:
        FrameDecoder().feed(line + b"\n")
    assert caught.value.code is Error.SCREENPOP_Framework_Error


def test_nesting_up_to_the_limit_is_accepted() -> None:
    line = b'{"op":"ping","a":' * (MAX_DEPTH - 1) + b'{"op":"x"}' + b"}" * (MAX_DEPTH - 1)
    assert FrameDecoder().feed(line + b"\n")[0]["op"] == "ping"


def test_blank_lines_are_keepalives() -> None:
    assert FrameDecoder().feed(b"\n \r\n\t\n" + encode({"op": "ping"})) == [{"op": "ping"}]


# -- what a client may send ---------------------------------------------------------------------


@QUICK
@given(frames)
def test_check_client_frame_accepts_or_names_the_error(frame: dict[str, Any]) -> None:
    try:
        checked = check_client_frame(dict(frame))
    except FrameError as exc:
        assert isinstance(exc.code, Error) and exc.message
        if frame["op"] in HUB_OPS - CLIENT_OPS:
            assert "only the hub may send" in exc.message
        return
    assert checked["op"] in CLIENT_OPS
    if checked["op"] == "ack":
        assert all(isinstance(i, str) for i in checked["ids"])
    if checked["op"] in ("register", "unregister"):
        assert checked["media"] in ("telephone", "callback", "email", "webcollab")
        assert 0 < len(checked["resource"]) <= 128


@pytest.mark.parametrize("op", sorted(HUB_OPS - CLIENT_OPS))
def test_frames_only_the_hub_sends(op: str) -> None:
    with pytest.raises(FrameError, match="only the hub may send") as caught:
        check_client_frame({"op": op, "ref": 3})
    assert caught.value.ref == 3


@pytest.mark.parametrize(
    "frame, code",
    [
        ({"op": "register", "media": "fax", "resource": "1"}, Error.SCREENPOP_Cannot_Register),
        ({"op": "register", "media": "telephone", "resource": ""}, Error.SCREENPOP_Cannot_Register),
        (
            {"op": "register", "media": "telephone", "resource": "   "},
            Error.SCREENPOP_Cannot_Register,
        ),
        (
            {"op": "register", "media": "telephone", "resource": "9" * 129},
            Error.SCREENPOP_Cannot_Register,
        ),
        (
            {"op": "register", "media": "telephone", "resource": "1\x00"},
            Error.SCREENPOP_Cannot_Register,
        ),
        (
            {"op": "register", "media": "telephone", "resource": ["1"]},
            Error.SCREENPOP_Cannot_Register,
        ),
        ({"op": "register", "media": "telephone"}, Error.SCREENPOP_Cannot_Register),
        ({"op": "ack"}, Error.SCREENPOP_Framework_Error),
        ({"op": "ack", "ids": "abc"}, Error.SCREENPOP_Framework_Error),
        ({"op": "ack", "ids": [1, 2]}, Error.SCREENPOP_Framework_Error),
        ({"op": "hello", "version": 3}, Error.SCREENPOP_Initialization_Error),
        ({"op": "hello", "version": True}, Error.SCREENPOP_Initialization_Error),
        ({"op": "hello"}, Error.SCREENPOP_Initialization_Error),
        ({"op": "subscribe"}, Error.SCREENPOP_Framework_Error),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_client_frames(frame: dict[str, Any], code: Error) -> None:
    with pytest.raises(FrameError) as caught:
        check_client_frame(frame)
    assert caught.value.code is code


# -- what a source may publish -------------------------------------------------------------------

pop_like = st.fixed_dictionaries(
    {},
    optional={
        "media": st.sampled_from(
            ["telephone", "callback", "email", "webcollab", "fax", "TELEPHONE ", ""]
        )
        | json_values,
        "resource": st.text(max_size=140) | json_values,
        "id": st.text(max_size=140) | json_values,
        "wait_time": st.integers(-5, 2 * 10**9) | json_values,
        "contact_data": st.dictionaries(
            st.text(max_size=8), st.text(max_size=8) | json_scalars, max_size=4
        )
        | json_values,
        "source": st.text(max_size=20) | json_values,
        "queue_name": st.text(max_size=1100),
        "color": json_values,
    },
)


@QUICK
@given(pop_like | st.lists(pop_like, max_size=3) | json_values)
def test_normalize_pops_accepts_or_names_the_field(body: Any) -> None:
    try:
        pops = normalize_pops(body)
    except InputError as exc:
        assert exc.status in (400, 422)
        problem = exc.to_dict()
        assert problem["error"] and problem["message"]
        if isinstance(body, list):
            assert problem["index"] < len(body)
        return
    for pop in pops:
        assert pop["media"] in ("telephone", "callback", "email", "webcollab")
        assert pop["resource"] and pop["resource"] == pop["resource"].strip()
        assert isinstance(pop["wait_time"], int) and pop["wait_time"] >= 0
        assert all(isinstance(pop[name], str) for name in TEXT_FIELDS)
        assert all(
            isinstance(k, str) and isinstance(v, str) for k, v in pop["contact_data"].items()
        )
        assert orjson.loads(encode({"op": "pop", "pop": pop}))["pop"] == pop


# -- the same bad input against a real hub's listener port --------------------------------------


hub, canary = module_hub_fixtures()


HELLO = encode({"op": "hello", "version": 1, "ref": 0})
# (what the client sends, after a hello or not, the code and words of the fatal error frame)
LISTENER_PORT_CASES = [
    (
        "random-bytes",
        False,
        bytes(range(256)) + b"\n",
        "SCREENPOP_Framework_Error",
        "not valid JSON",
    ),
    (
        "over-long-line",
        True,
        b'{"op":"ping","x":"' + b"a" * 70_000,
        "SCREENPOP_Framework_Error",
        "longer than 65536",
    ),
    (
        "over-long-with-newline",
        True,
        b" " * 70_000 + b"\n",
        "SCREENPOP_Framework_Error",
        "longer than 65536",
    ),
    (
        "invalid-utf8",
        True,
        b'{"op":"register","media":"telephone","resource":"\xff\xfe"}\n',
        "SCREENPOP_Framework_Error",
        "not valid JSON",
    ),
    (
        "deep-nesting",
        True,
        b'{"op":"status","ref":' + b"[" * 10_000 + b"]" * 10_000 + b"}\n",
        "SCREENPOP_Framework_Error",
        "nested deeper",
    ),
    ("array-frame", True, b"[1,2]\n", "SCREENPOP_Framework_Error", "not a JSON object"),
    (
        "welcome-from-client",
        True,
        encode({"op": "welcome", "version": 1}),
        "SCREENPOP_Framework_Error",
        "only the hub may send 'welcome'",
    ),
    (
        "pop-from-client",
        True,
        encode({"op": "pop", "pop": {}}),
        "SCREENPOP_Framework_Error",
        "only the hub may send 'pop'",
    ),
    (
        "ok-from-client",
        True,
        encode({"op": "ok", "ref": 1}),
        "SCREENPOP_Framework_Error",
        "only the hub may send 'ok'",
    ),
    (
        "error-from-client",
        True,
        encode({"op": "error", "code": "x"}),
        "SCREENPOP_Framework_Error",
        "only the hub may send 'error'",
    ),
    (
        "unknown-op",
        True,
        encode({"op": "subscribe"}),
        "SCREENPOP_Framework_Error",
        "unknown op 'subscribe'",
    ),
    (
        "register-before-hello",
        False,
        encode({"op": "register", "media": "telephone", "resource": "1"}),
        "SCREENPOP_Initialization_Error",
        "before hello",
    ),
    (
        "ack-before-hello",
        False,
        encode({"op": "ack", "id": "x"}),
        "SCREENPOP_Initialization_Error",
        "before hello",
    ),
    (
        "publish-before-hello",
        False,
        encode({"op": "publish", "pops": {}}),
        "SCREENPOP_Initialization_Error",
        "before hello",
    ),
    (
        "wrong-version",
        False,
        encode({"op": "hello", "version": 99}),
        "SCREENPOP_Initialization_Error",
        "version 99 not supported",
    ),
    (
        "version-as-a-float",
        False,
        encode({"op": "hello", "version": 1.0}),
        "SCREENPOP_Initialization_Error",
        "protocol version <float> not supported (hub speaks 1 and 2)",
    ),
    (
        "version-as-a-string",
        False,
        encode({"op": "hello", "version": "2"}),
        "SCREENPOP_Initialization_Error",
        "protocol version '2' not supported (hub speaks 1 and 2)",
    ),
    (
        "version-true",
        False,
        encode({"op": "hello", "version": True}),
        "SCREENPOP_Initialization_Error",
        "protocol version <bool> not supported (hub speaks 1 and 2)",
    ),
    (
        "no-version",
        False,
        encode({"op": "hello"}),
        "SCREENPOP_Initialization_Error",
        "hello needs a version (1 or 2)",
    ),
    ("second-hello", True, HELLO, "SCREENPOP_Wrong_Status", "second hello"),
    (
        "unknown-media",
        True,
        encode({"op": "register", "media": "fax", "resource": "1"}),
        "SCREENPOP_Cannot_Register",
        "unknown media 'fax'",
    ),
    (
        "empty-resource",
        True,
        encode({"op": "register", "media": "telephone", "resource": ""}),
        "SCREENPOP_Cannot_Register",
        "resource is empty",
    ),
    (
        "absurd-resource",
        True,
        encode({"op": "register", "media": "telephone", "resource": "9" * 5000}),
        "SCREENPOP_Cannot_Register",
        "at most 128",
    ),
    (
        "control-resource",
        True,
        encode({"op": "register", "media": "telephone", "resource": "1\u0007"}),
        "SCREENPOP_Cannot_Register",
        "control characters",
    ),
    ("ack-without-id", True, encode({"op": "ack"}), "SCREENPOP_Framework_Error", "ack needs"),
]


async def fatal_answer(port: int, greet: bool, data: bytes) -> list[dict[str, Any]]:
    raw = await RawClient.open(port)
    if greet:
        assert (await raw.hello())["op"] == "welcome"
    for i in range(0, len(data), 16_384):  # as a real peer would, in pieces
        await raw.send(data[i : i + 16_384])
    try:
        return await raw.frames_until_closed()
    finally:
        raw.close()


@pytest.mark.parametrize(
    "greet, data, code, words",
    [c[1:] for c in LISTENER_PORT_CASES],
    ids=[c[0] for c in LISTENER_PORT_CASES],
)
def test_listener_port_bad_input(
    hub: HubThread, canary: Canary, greet: bool, data: bytes, code: str, words: str
) -> None:
    frames = run(fatal_answer(hub.options["port"], greet, data))
    assert [f["op"] for f in frames] == ["error"], frames
    assert (
        frames[0]["code"] == code and words in frames[0]["message"] and frames[0]["fatal"] is True
    )
    canary.check(f"after-{words}")


def test_truncated_frame_then_gone(hub: HubThread, canary: Canary) -> None:
    async def body() -> None:
        raw = await RawClient.open(hub.options["port"])
        await raw.hello()
        await raw.send(b'{"op":"register","media":"telephone","reso')
        raw.close()  # mid-frame: nothing is registered, nothing breaks

    run(body())
    canary.check("after-truncated")
    assert all(entry["resource"] != "reso" for entry in hub.status()["listeners"])


def test_acks_for_unknown_pops_are_counted_not_fatal(hub: HubThread, canary: Canary) -> None:
    async def body() -> None:
        raw = await RawClient.open(hub.options["port"])
        await raw.hello()
        await raw.send({"op": "ack", "ids": ["no-such-pop", "nor-this-one"]})
        await raw.send({"op": "ping"})
        assert await raw.frame() == {"op": "pong"}  # still connected
        raw.close()

    before = hub.status()["counters"].get("unknown_acks", 0)
    run(body())
    assert hub.status()["counters"]["unknown_acks"] == before + 2
    canary.check("after-unknown-acks")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    greet=st.booleans(),
    sent=st.lists(frames.map(encode) | st.binary(min_size=1, max_size=80), min_size=1, max_size=4),
)
def test_listener_port_fuzz(hub: HubThread, greet: bool, sent: list[bytes]) -> None:
    async def body() -> None:
        raw = await RawClient.open(hub.options["port"])
        try:
            if greet:
                await raw.hello()
            for data in [*sent, encode({"op": "ping"})]:
                await raw.send(data)
            # Whatever came before, the hub answers or closes with an error frame naming a code.
            while (frame := await raw.frame()) is not None:
                assert frame["op"] in HUB_OPS
                if frame["op"] == "error":
                    assert frame["code"] in {e.value for e in Error}
                if frame.get("fatal") or frame["op"] == "pong":
                    break
        except ConnectionError:
            pass  # we wrote on after a fatal error: the hub had closed
        finally:
            raw.close()

    run(body())


def test_hub_serves_after_the_listener_port_fuzz(hub: HubThread, canary: Canary) -> None:
    canary.check("after-fuzz")
    assert hub.status()["counters"]["frame_errors"] > 0
