"""Bad input on the HTTP port: each gets a precise status and JSON body, and the hub serves on.

One hub for the module (HTTP body limit lowered to 64 KiB), one canary listener that must still
get a pop after every bad request, and hypothesis posting arbitrary bodies through a real server.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HubThread
from hubproc import Canary, module_hub_fixtures
from spop_cli.pops import InputError, normalize_pops

MAX_BODY = 64 * 1024


hub, canary = module_hub_fixtures(max_body=MAX_BODY)


def post(
    hub: HubThread,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, Any]:
    """One request on a fresh connection; the JSON answer decoded (raw text when it is not JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", hub.options["http_port"], timeout=10)
    try:
        conn.request(
            method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")
    finally:
        conn.close()


BAD_BODIES = [
    (b"not json", 400, "invalid_json"),
    (b"\xff\xfe\x00{", 400, "invalid_json"),
    (b'{"media": "telephone", "resource": "\xc3\x28"}', 400, "invalid_json"),
    (b'{"media": "telephone", "resource": "1"', 400, "invalid_json"),
    (b"", 400, "invalid_json"),
    (b"[" * 200 + b"]" * 200, 400, "too_deep"),
    (
        b'{"media": "telephone", "resource": "1", "contact_data": '
        + b'{"a": ' * 100
        + b"1"
        + b"}" * 101,
        400,
        "too_deep",
    ),
    (b'"a string"', 400, "not_an_object"),
    (b"42", 400, "not_an_object"),
    (b'{"media": "fax", "resource": "1"}', 422, "unknown_media"),
    (b'{"media": ["telephone"], "resource": "1"}', 422, "unknown_media"),
    (b'{"media": "telephone", "resource": ""}', 422, "invalid_resource"),
    (b'{"media": "telephone", "resource": "   "}', 422, "invalid_resource"),
    (b'{"media": "telephone", "resource": "' + b"9" * 129 + b'"}', 422, "invalid_resource"),
    (b'{"media": "telephone", "resource": "1\\u0000"}', 422, "invalid_resource"),
    (b'{"media": "telephone", "resource": 13579}', 422, "invalid_resource"),
    (b'{"media": "telephone", "resource": "1", "wait_time": "ten"}', 422, "wrong_type"),
    (b'{"media": "telephone", "resource": "1", "source": {"x": 1}}', 422, "wrong_type"),
    (b'{"media": "telephone", "resource": "1", "contact_data": {"k": ["v"]}}', 422, "wrong_type"),
    (
        b'{"media": "telephone", "resource": "1", "queue_name": "' + b"q" * 1025 + b'"}',
        422,
        "too_long",
    ),
    (b'{"media": "telephone", "resource": "1", "' + b"x" * 5000 + b'": 1}', 422, "unknown_field"),
]


@pytest.mark.parametrize(
    "body, status, error", BAD_BODIES, ids=[f"{e}-{i}" for i, (_, _, e) in enumerate(BAD_BODIES)]
)
def test_bad_body_gets_precise_error_and_hub_serves_on(
    hub: HubThread, canary: Canary, body: bytes, status: int, error: str
) -> None:
    got_status, answer = post(hub, "/v1/pops", body)
    assert (got_status, answer["error"]) == (status, error), answer
    assert (
        answer["message"] and len(answer["message"]) < 400
    )  # names the fault, never echoes the input
    canary.check(f"after-{error}")


def test_body_over_the_limit_is_413(hub: HubThread, canary: Canary) -> None:
    big = json.dumps(
        {"media": "telephone", "resource": "1", "contact_description": "x" * MAX_BODY}
    ).encode()
    status, answer = post(hub, "/v1/pops", big)
    assert status == 413 and answer["error"] == "too_large"
    canary.check("after-413")


def test_chunked_body_over_the_limit_is_413(hub: HubThread, canary: Canary) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", hub.options["http_port"], timeout=10)
    chunks = (
        b"[" + b'{"media":"telephone","resource":"1"},' * 100 for _ in range(30)
    )  # ~110 KB, no length
    try:
        conn.request(
            "POST",
            "/v1/pops",
            body=chunks,
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        status, answer = response.status, json.loads(response.read())
    except (BrokenPipeError, ConnectionResetError):
        pytest.fail("the hub cut the connection instead of answering 413")
    finally:
        conn.close()
    assert status == 413 and answer["error"] == "too_large"
    canary.check("after-chunked-413")


def test_wrong_path_and_method_are_json(hub: HubThread, canary: Canary) -> None:
    status, answer = post(hub, "/v1/nothing", b"{}")
    assert status == 404 and answer["error"] == "not_found"
    status, answer = post(hub, "/v1/pops", b"", method="GET")
    assert status == 405 and answer["error"] == "method_not_allowed"
    canary.check("after-404-405")


def _response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP response off a raw socket: its head and its Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest[:length]


def test_pops_sent_after_100_continue_or_with_a_query_string_are_taken(
    hub: HubThread, canary: Canary
) -> None:
    """POST /v1/pops skips aiohttp's router, except with `Expect: 100-continue` (the application
    answers that before the body comes): both ways give the same answer, and the pops arrive."""
    body = json.dumps(
        {"id": "continue-1", "media": "telephone", "resource": "canary", "source": "continue"}
    ).encode()
    with socket.create_connection(("127.0.0.1", hub.options["http_port"]), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/pops HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        head, _ = _response(sock)
        assert head == b"HTTP/1.1 100 Continue"
        sock.sendall(body)
        head, answer = _response(sock)
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    assert json.loads(answer) == {"accepted": 1, "ids": ["continue-1"]}
    body = json.dumps(
        {"id": "query-1", "media": "telephone", "resource": "canary", "source": "query"}
    )
    assert post(hub, "/v1/pops?from=test", body.encode()) == (
        200,
        {"accepted": 1, "ids": ["query-1"]},
    )
    deadline = time.monotonic() + 5
    while not {"continue", "query"} <= set(canary.got):
        assert time.monotonic() < deadline, canary.got
        time.sleep(0.005)


def test_a_body_too_deep_is_named_so_before_any_other_fault(hub: HubThread, canary: Canary) -> None:
    """The nesting of a pops body is checked only when the body is refused, and then first: a
    batch with a pop of unknown media and one nested 70 deep is `too_deep`, as it always was."""
    deep = (
        b'{"media": "telephone", "resource": "1", "contact_data": '
        + b'{"a": ' * 70
        + b'"x"'
        + b"}" * 71
    )
    status, answer = post(hub, "/v1/pops", b'[{"media": "fax", "resource": "1"}, ' + deep + b"]")
    assert (status, answer["error"]) == (400, "too_deep")
    status, answer = post(hub, "/v1/pops", b'[{"media": "fax", "resource": "1"}]')
    assert (status, answer["error"], answer["index"]) == (422, "unknown_media", 0)
    canary.check("after-deep-batch")


def test_contacts_endpoint_refuses_garbage_too(hub: HubThread, canary: Canary) -> None:
    status, answer = post(hub, "/v1/contacts", b"\xff garbage")
    assert status == 400 and answer["error"] == "invalid_json"
    status, answer = post(hub, "/v1/contacts", b"[" * 100 + b"]" * 100)
    assert status == 400 and answer["error"] == "too_deep"
    canary.check("after-contacts-garbage")


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
        + bytes(range(256)),  # a TLS hello to a plain port
        b"GARBAGE / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/pops HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
        b'POST /v1/pops HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"media"',  # then silence
        bytes(range(256)) * 40 + b"\r\n\r\n",
    ],
    ids=["tls-hello", "bad-method", "long-header", "truncated-body", "random-bytes"],
)
def test_non_http_bytes_on_the_http_port(hub: HubThread, canary: Canary, raw: bytes) -> None:
    with socket.create_connection(("127.0.0.1", hub.options["http_port"]), timeout=5) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)  # a truncated body ends here: the peer went away mid-request
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    # aiohttp's parser answers what is not HTTP (plain text: such a peer reads no JSON anyway)
    assert answer == b"" or answer.split(b" ")[1] in (b"400", b"413", b"431"), answer[:200]
    canary.check(f"after-raw-{raw[:8]!r}")


# -- hypothesis against the real server -------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
pops = st.fixed_dictionaries(
    {},
    optional={
        "media": st.sampled_from(["telephone", "email", "Callback", "webcollab", "fax"]) | values,
        "resource": st.sampled_from(["13579", "", " x ", "\t", "a" * 129])
        | st.text(max_size=10)
        | values,
        "id": st.text(max_size=10) | values,
        "wait_time": st.integers(-2, 10**10) | values,
        "contact_data": st.dictionaries(st.text(max_size=6), scalars, max_size=3) | values,
        "destination": values,
        "queue": values,
    },
)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(body=pops | st.lists(pops, max_size=3) | values)
def test_the_server_agrees_with_normalize_pops(hub: HubThread, body: Any) -> None:
    try:
        expected = normalize_pops(body)
    except InputError as exc:
        status, answer = post(hub, "/v1/pops", json.dumps(body).encode())
        assert (status, answer["error"]) == (exc.status, exc.error)
        assert answer.get("field") == exc.field and answer.get("index") == exc.index
        return
    status, answer = post(hub, "/v1/pops", json.dumps(body).encode())
    assert status == 200 and answer["accepted"] == len(expected)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(raw=st.binary(max_size=300))
def test_random_bytes_as_a_body(hub: HubThread, raw: bytes) -> None:
    status, answer = post(hub, "/v1/pops", raw)
    assert status in (200, 400, 422), answer
    assert isinstance(answer, dict) and ("ids" in answer if status == 200 else answer["error"])


def test_hub_still_serves_after_the_fuzzing(hub: HubThread, canary: Canary) -> None:
    canary.check("after-fuzz")
    assert hub.status()["counters"]["rejected"] > 0
