"""What a third-party client reads (docs/protocol.md, docs/reliability.md, openapi.json) is what the
hub does (issue 10, section 5). Real hubs on loopback ports, real sockets, real subprocesses."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubproc import (
    LOOPBACK,
    HubProcess,
    RawClient,
    http_of,
    http_post,
    inprocess_hub,
    pop,
    run,
    until,
)
from spop_cli.hub.contacts import MAX_CONTACT_ID_LEN as CONTACTS_MAX_CONTACT_ID
from spop_cli.model import (
    MAX_CONTACT_ID_LEN,
    MAX_ID_LEN,
    MEDIA_PATTERN,
    RESOURCE_PATTERN,
    Media,
    ScreenPopError,
    parse_time,
    validate_resource,
)
from spop_cli.pops import MAX_CONTACT_ID, MAX_ID

ROOT = Path(__file__).resolve().parents[1]
DOC = json.loads((ROOT / "docs" / "openapi.json").read_text(encoding="utf-8"))
SCHEMAS = DOC["components"]["schemas"]
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
RELIABILITY = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")


def accepted(resource: Any) -> bool:
    try:
        validate_resource(resource)
    except ScreenPopError:
        return False
    return True


# -- one resource rule, one media rule ---------------------------------------------------------


def test_the_schema_patterns_are_the_hubs_rules() -> None:
    assert SCHEMAS["Resource"]["pattern"] == RESOURCE_PATTERN
    assert SCHEMAS["Media"]["pattern"] == MEDIA_PATTERN
    # the length is in the pattern: maxLength would refuse a padded resource the hub trims
    assert "maxLength" not in SCHEMAS["Resource"]


@settings(max_examples=400, deadline=None)
@given(
    st.text(max_size=140)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=8).map(lambda t: f"  13{t}579 ")
    | st.sampled_from(
        [" ", "x" * 128, "x" * 129, " " + "y" * 128 + " ", "1\n", "\u00a0", "\U000e0041", "\u0378"]
    )
)
def test_resource_pattern_and_validate_resource_agree(text: str) -> None:
    assert (re.search(RESOURCE_PATTERN, text) is not None) == accepted(text)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([m.value for m in Media])
    .flatmap(
        lambda word: st.tuples(
            st.text(" ", max_size=2), st.just(word), st.text(" \t\n", max_size=2)
        )
    )
    .map(
        lambda parts: (
            parts[0] + "".join(c.upper() if i % 2 else c for i, c in enumerate(parts[1])) + parts[2]
        )
    )
    | st.text(max_size=12)
)
def test_media_pattern_and_media_parse_agree(word: str) -> None:
    try:
        Media.parse(word)
        parsed = True
    except ScreenPopError:
        parsed = False
    assert (re.search(MEDIA_PATTERN, word) is not None) == parsed


# One row per class of character the rule names (docs/protocol.md "Media and resources").
RESOURCES = [
    ("13579", True),
    ("  13579  ", True),
    ("Jean Dupont-Éluard", True),
    ("13\u0378579", True),  # unassigned today: allowed, whatever each side's Unicode version
    ("x" * 128, True),
    ("x" * 129, False),
    ("13\u00a0579", False),  # no-break space
    ("13\u00ad579", False),  # soft hyphen
    ("13\u200d579", False),  # zero-width joiner
    ("13\u2028579", False),  # line separator
    ("13\u0085579", False),  # C1
    ("13\ue000579", False),  # private use
    ("13\U00100000", False),  # supplementary private use
    ("13\U000e0041", False),  # tag
    ("\t13579", False),  # only spaces are trimmed
]


@pytest.mark.parametrize("resource, ok", RESOURCES, ids=[f"r{i}" for i in range(len(RESOURCES))])
def test_one_resource_rule_on_both_ports(resource: str, ok: bool) -> None:
    """register and publish on the listener port, /v1/pops and /v1/contacts: the same verdict."""

    async def body() -> None:
        async with inprocess_hub() as hub:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            published = await raw.request(
                "publish", pops={"media": "telephone", "resource": resource}
            )
            await raw.send(
                {"op": "register", "ref": "reg", "media": "telephone", "resource": resource}
            )
            registered = await raw.frame()
            raw.close()
            pops_status, _ = await asyncio.to_thread(
                http_post, http_of(hub) + "/v1/pops", {"media": "telephone", "resource": resource}
            )
            event = {"contact_id": "c-1", "event": "routed", "resource": resource}
            contacts_status, _ = await asyncio.to_thread(
                http_post, http_of(hub) + "/v1/contacts", event
            )
            verdicts = {
                "publish": published["op"] == "ok",
                "register": registered is not None and registered["op"] == "ok",
                "/v1/pops": pops_status == 200,
                "/v1/contacts": contacts_status == 200,
            }
            assert verdicts == dict.fromkeys(verdicts, ok)
            if not ok:
                assert registered is not None
                assert (registered["code"], registered["fatal"]) == (
                    "SCREENPOP_Cannot_Register",
                    True,
                )

    run(body())


# -- created_at ---------------------------------------------------------------------------------


def test_created_at_is_checked_and_sent_on_in_utc() -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            assert (await raw.request("register", media="telephone", resource="13579"))[
                "op"
            ] == "ok"
            status, answer = await asyncio.to_thread(
                http_post, http_of(hub) + "/v1/pops", pop(created_at="2024-05-14T11:00:10+02:00")
            )
            assert status == 200
            frame = await raw.frame()
            assert frame is not None and frame["pop"]["created_at"] == "2024-05-14T09:00:10.000Z"
            jsonschema = pytest.importorskip("jsonschema")
            schema = {**SCHEMAS["Pop"], "components": DOC["components"]}
            jsonschema.Draft202012Validator(schema).validate(frame["pop"])
            status, answer = await asyncio.to_thread(
                http_post, http_of(hub) + "/v1/pops", pop(created_at="not a time")
            )
            assert (status, answer) == (
                422,
                {
                    "error": "bad_time",
                    "message": "created_at is not an ISO 8601 time: 'not a time'",
                    "field": "created_at",
                },
            )
            raw.close()

    run(body())


@settings(max_examples=150, deadline=None)
@given(
    st.datetimes(  # years 1 and 9999 with an offset have no UTC time in Python: refused (bad_time)
        min_value=datetime(2, 1, 1),
        max_value=datetime(9998, 12, 31),
        timezones=st.just(UTC)
        | st.builds(lambda m: timezone(timedelta(minutes=m)), st.integers(-1439, 1439)),
    ),
    st.sampled_from(["T", "t"]),
    st.booleans(),
)
def test_every_time_the_schema_format_accepts_the_hub_accepts(
    moment: datetime, sep: str, z: bool
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    text = moment.isoformat(sep=sep)
    if z and text.endswith("+00:00"):
        text = text[:-6] + "z"
    if jsonschema.Draft202012Validator.FORMAT_CHECKER.conforms(text, "date-time"):
        assert parse_time(text) == moment.astimezone(UTC)


# -- id and contact_id lengths ------------------------------------------------------------------


def limit_row(name: str) -> str:
    rows = [line for line in RELIABILITY.splitlines() if line.startswith(f"| {name} ")]
    assert len(rows) == 1, name
    return rows[0]


def test_id_and_contact_id_limits_agree_in_docs_schema_and_hub() -> None:
    assert MAX_ID == MAX_ID_LEN == 128
    assert MAX_CONTACT_ID == CONTACTS_MAX_CONTACT_ID == MAX_CONTACT_ID_LEN == 256
    assert "| 128 characters |" in limit_row("`id` of a pop")
    assert "| 256 characters |" in limit_row("`contact_id` (pops and contact events)")
    assert SCHEMAS["PopInput"]["properties"]["id"]["maxLength"] == MAX_ID
    assert SCHEMAS["PopInput"]["properties"]["contact_id"]["maxLength"] == MAX_CONTACT_ID
    assert SCHEMAS["ContactId"]["maxLength"] == MAX_CONTACT_ID


@pytest.mark.parametrize(
    "path, length, status",
    [
        ("/v1/pops", 256, 200),
        ("/v1/pops", 257, 422),
        ("/v1/contacts", 256, 200),
        ("/v1/contacts", 257, 422),
    ],
)
def test_contact_id_of_256_passes_and_257_is_refused_on_both_routes(
    path: str, length: int, status: int
) -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            contact_id = "c" * length
            item = (
                pop(contact_id=contact_id)
                if path == "/v1/pops"
                else {"contact_id": contact_id, "event": "queued"}
            )
            got, answer = await asyncio.to_thread(http_post, http_of(hub) + path, item)
            assert got == status
            if status == 422:
                assert (answer["error"], answer["field"]) == ("too_long", "contact_id")

    run(body())


# -- contact_data: one rule ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/pops", "/v1/contacts"])
def test_an_empty_contact_data_key_is_refused_on_both_routes(path: str) -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            item = (
                pop(contact_data={"": "v"})
                if path == "/v1/pops"
                else {"contact_id": "c-1", "event": "queued", "contact_data": {"": "v"}}
            )
            status, answer = await asyncio.to_thread(http_post, http_of(hub) + path, item)
            assert (status, answer["error"], answer["field"], answer["message"]) == (
                422,
                "wrong_key",
                "contact_data",
                "contact_data has an empty key",
            )
            assert hub.status()["pending"] == 0 and hub.status()["contacts"] == 0

    run(body())


# -- 404 and 405 --------------------------------------------------------------------------------


def raw_request(port: int, method: str, path: str) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("GET", "/v1/pops", "POST"),
        ("PUT", "/v1/contacts", "POST"),
        ("POST", "/v1/status", "GET,HEAD"),
        ("DELETE", "/v1/health", "GET,HEAD"),
        ("POST", "/openapi.json", "GET,HEAD"),
    ],
)
def test_405_names_the_allowed_methods_and_is_documented(
    method: str, path: str, allow: str
) -> None:
    jsonschema = pytest.importorskip("jsonschema")

    async def body() -> None:
        async with inprocess_hub() as hub:
            status, headers, answer = await asyncio.to_thread(
                raw_request, hub.http_port, method, path
            )
            assert status == 405
            assert headers["Allow"] == allow
            assert answer == {
                "error": "method_not_allowed",
                "message": f"{method!r} not allowed here; allowed: {allow}",
            }
            documented = next(iter(DOC["paths"][path].values()))["responses"]["405"]
            assert documented == {"$ref": "#/components/responses/MethodNotAllowed"}
            response = DOC["components"]["responses"]["MethodNotAllowed"]
            assert "Allow" in response["headers"]
            schema = {
                **response["content"]["application/json"]["schema"],
                "components": DOC["components"],
            }
            jsonschema.Draft202012Validator(schema).validate(answer)

    run(body())


def test_404_is_documented_and_matches_its_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")

    async def body() -> None:
        async with inprocess_hub() as hub:
            status, _, answer = await asyncio.to_thread(
                raw_request, hub.http_port, "GET", "/v2/pops"
            )
            assert (status, answer) == (
                404,
                {"error": "not_found", "message": "no such path '/v2/pops'"},
            )
            response = DOC["components"]["responses"]["NotFound"]
            schema = {
                **response["content"]["application/json"]["schema"],
                "components": DOC["components"],
            }
            jsonschema.Draft202012Validator(schema).validate(answer)
            assert "404 `not_found`" in DOC["info"]["description"]

    run(body())


# -- a NUL byte in a header: nothing on stderr --------------------------------------------------


def test_a_nul_byte_in_a_header_leaves_stderr_clean(tmp_path: Path) -> None:
    config = tmp_path / "spop.toml"
    config.write_text("[hub]\nmax_connections = 100\n")  # no open-file warning on small machines
    hub = HubProcess(tmp_path, "--config", str(config), journal=False).start()
    try:
        for _ in range(3):
            with socket.create_connection((LOOPBACK, hub.http_port), timeout=5) as sock:
                sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: hub\r\nX-Bad: a\x00b\r\n\r\n")
                answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n")
        status, _ = http_post(hub.http + "/v1/pops", pop(source="after"))
        assert status == 200  # and it serves on
        hub.stop()
        lines = hub.output().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spop hub: listeners on 127.0.0.1 port ")
        diagnostics = "".join(p.read_text() for p in (tmp_path / "diag").glob("hub.*"))
        assert diagnostics.count("Invalid header value char") == 3
        assert "Traceback" not in diagnostics
    finally:
        hub.kill()


# -- welcome and hello --------------------------------------------------------------------------


@pytest.mark.parametrize("heartbeat, shown", [(10.0, 10), (1.0, 1), (0.5, 0.5)])
def test_welcome_is_as_documented(heartbeat: float, shown: int | float) -> None:
    async def body() -> None:
        async with inprocess_hub(heartbeat=heartbeat) as hub:
            raw = await RawClient.open(hub.port)
            await raw.send(b'{"op":"hello","version":1,"ref":1}\n')
            line = await asyncio.wait_for(raw.reader.readline(), 5)
            raw.close()
            assert orjson.loads(line) == {
                "op": "welcome",
                "version": 1,
                "server": "spop",
                "heartbeat": shown,
                "max_frame": 65536,
                "pop_ttl": 120,
                "max_registrations": 10000,
                "ref": 1,
            }
            if isinstance(shown, int):
                assert b'"heartbeat":%d,' % shown in line  # an integer on the wire, not 10.0

    run(body())
    row = next(line for line in PROTOCOL.splitlines() if line.startswith("| `welcome` |"))
    assert "`ref`" in row and "integer" in row
    assert '"heartbeat":10.0' not in PROTOCOL


def test_a_client_that_never_says_hello_gets_no_hello_in_time_not_dead_peer() -> None:
    # three heartbeats (0.3 s) pass well before the handshake timeout (0.75 s)
    async def body() -> None:
        async with inprocess_hub(heartbeat=0.1, handshake_timeout=0.75) as hub:
            raw = await RawClient.open(hub.port)
            started = time.monotonic()
            frames = []
            while (frame := await raw.frame(timeout=10, pings=True)) is not None:
                frames.append(frame)
            waited = time.monotonic() - started
            assert frames == [
                {
                    "op": "error",
                    "code": "SCREENPOP_Initialization_Error",
                    "message": "no hello in time",
                    "fatal": True,
                }
            ]
            assert waited >= 0.75 - 0.05
            assert hub.status()["counters"].get("dead_peers", 0) == 0
            raw.close()

    run(body())


def test_a_request_without_ref_is_answered_without_ref() -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            raw = await RawClient.open(hub.port)
            await raw.send(b'{"op":"hello","version":1}\n')
            welcome = await raw.frame()
            assert welcome is not None and "ref" not in welcome
            await raw.send(b'{"op":"register","media":"telephone","resource":"13579"}\n')
            assert await raw.frame() == {"op": "ok"}
            assert hub.status()["registrations"] == 1
            raw.close()

    run(body())
    assert "A request **without** `ref`" in PROTOCOL


# -- ended withdraws pops sent and not acked; the listener is not told -------------------------


def test_ended_withdraws_a_pop_sent_but_not_acked_silently_as_documented() -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            assert (await raw.request("register", media="telephone", resource="13579"))[
                "op"
            ] == "ok"
            url = http_of(hub) + "/v1/contacts"
            routed = {"contact_id": "call-1", "event": "routed", "resource": "13579"}
            status, answer = await asyncio.to_thread(http_post, url, routed)
            assert status == 200
            frame = await raw.frame()
            assert frame is not None and frame["pop"]["id"] == answer["pops"][0]
            # shown, not acked; the contact ends
            status, _ = await asyncio.to_thread(
                http_post, url, {"contact_id": "call-1", "event": "ended"}
            )
            assert status == 200
            assert hub.status()["counters"]["withdrawn"] == 1 and hub.status()["pending"] == 0
            await raw.send({"op": "ack", "id": answer["pops"][0]})  # the late ack
            assert await until(lambda: hub.status()["counters"].get("unknown_acks") == 1, 5)
            # nothing told, and never sent again, not even to a new registration
            second = await RawClient.open(hub.port)
            await second.hello()
            assert (await second.request("register", media="telephone", resource="13579"))[
                "op"
            ] == "ok"
            await second.send({"op": "ping"})
            assert await second.frame(pings=True) == {"op": "pong"}
            await raw.send({"op": "ping"})
            assert await raw.frame(pings=True) == {"op": "pong"}
            raw.close()
            second.close()

    run(body())
    for doc in (PROTOCOL, RELIABILITY):
        assert "sent and not yet acked" in doc or "already sent to a\n  listener" in doc


# -- when the hub stops -------------------------------------------------------------------------


def test_a_stopping_hub_closes_connections_without_a_frame_as_documented(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path).start()
    try:

        async def body() -> None:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            assert (await raw.request("register", media="telephone", resource="13579"))[
                "op"
            ] == "ok"
            await asyncio.to_thread(hub.stop)
            assert await raw.frames_until_closed(10) == []
            raw.close()

        run(body())
    finally:
        hub.kill()
    assert "## When the hub stops, crashes, or closes the connection" in PROTOCOL
    assert "**After a fatal `error`**" in PROTOCOL


@pytest.mark.parametrize("given_id, wire_id", [(0, "0"), (17, "17"), ("p-1", "p-1")])
def test_a_number_given_as_id_is_text_and_still_deduplicates(given_id: Any, wire_id: str) -> None:
    async def body() -> None:
        async with inprocess_hub() as hub:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            assert (await raw.request("register", media="telephone", resource="13579"))[
                "op"
            ] == "ok"
            url = http_of(hub) + "/v1/pops"
            first = await asyncio.to_thread(http_post, url, pop(id=given_id))
            frame = await raw.frame()
            assert frame is not None and frame["pop"]["id"] == wire_id
            await raw.send({"op": "ack", "id": wire_id})
            assert await until(lambda: hub.status()["pending"] == 0, 5)
            # acked, then sent again with the same id: the same pop, not a second one
            second = await asyncio.to_thread(http_post, url, pop(id=given_id))
            assert first == second == (200, {"accepted": 1, "ids": [wire_id]})
            assert hub.status()["counters"]["duplicates"] == 1
            assert hub.status()["pending"] == 0
            raw.close()

    run(body())
