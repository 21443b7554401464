"""The OpenAPI document: served as shipped, covers every route, and real answers match its schemas."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import HubThread
from spop_cli import ScreenPopTelephoneListener
from spop_cli.hub.http import make_app
from spop_cli.hub.server import Hub, HubConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS_COPY = ROOT / "docs" / "openapi.json"
PACKAGED = ROOT / "src" / "spop_cli" / "openapi.json"
DOC: dict[str, Any] = json.loads(DOCS_COPY.read_text(encoding="utf-8"))
SOURCE_TOKEN = "source-secret"
LISTENER_TOKEN = "listener-secret"


def call(
    hub: HubThread,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    token: str | None = None,
) -> tuple[int, str, Any]:
    """(status, content type, JSON body) of one real request to the hub's HTTP port."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(hub.http + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get_content_type(), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get_content_type(), json.loads(exc.read())


def validator(schema: dict[str, Any]) -> Any:
    """A JSON Schema 2020-12 validator whose `#/components/...` refs resolve in the document."""
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft202012Validator(
        {**schema, "components": DOC["components"]},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,  # date-time is a promise too
    )


def response_schema(path: str, method: str, status: int) -> dict[str, Any]:
    answer = DOC["paths"][path][method.lower()]["responses"][str(status)]
    if "$ref" in answer:
        answer = DOC["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
    return answer["content"]["application/json"]["schema"]


def request_schema(path: str) -> dict[str, Any]:
    return DOC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def checked(
    hub: HubThread, method: str, path: str, body: Any = None, **options: Any
) -> tuple[int, Any]:
    """Send a request; its answer must be JSON, documented for its status, and match the schema."""
    status, content_type, answer = call(hub, method, path, body, **options)
    assert content_type == "application/json"
    validator(response_schema(path, method, status)).validate(answer)
    return status, answer


def test_served_document_is_the_one_in_docs(hub: HubThread) -> None:
    assert PACKAGED.read_bytes() == DOCS_COPY.read_bytes()
    status, content_type, served = call(hub, "GET", "/openapi.json")
    assert (status, content_type) == (200, "application/json")
    assert served == DOC


def test_document_is_openapi_3_1() -> None:
    assert DOC["openapi"].startswith("3.1.")
    validate = pytest.importorskip("openapi_spec_validator").validate
    validate(DOC)


def test_every_route_of_the_app_is_documented_and_no_other() -> None:
    app = make_app(Hub(HubConfig(http_port=0)))
    # aiohttp adds a HEAD route beside each GET; the document describes the GET
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, item in DOC["paths"].items() for method in item}
    assert routes == documented


def test_every_contact_event_is_documented() -> None:
    from spop_cli.hub.contacts import EVENT_FIELDS, QUEUE_FIELDS

    mapping = DOC["components"]["schemas"]["ContactEvent"]["discriminator"]["mapping"]
    assert set(mapping) == set(EVENT_FIELDS)
    for kind, ref in mapping.items():
        schema = DOC["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert schema["properties"]["event"] == {"const": kind}
        takes = set(schema["properties"]) - {"id", "contact_id", "event", "at"}
        contact_fields = (
            set(QUEUE_FIELDS)
            if kind == "requeued"
            else {
                "media",
                "source",
                "destination",
                "queue_name",
                "contact_description",
                "contact_data",
            }
        )
        assert takes == contact_fields | set(EVENT_FIELDS[kind]), kind
        assert ("resource" in schema["required"]) == ("resource" in EVENT_FIELDS[kind])


def test_pop_schema_has_every_field_of_the_wire_pop() -> None:
    from spop_cli.pops import KNOWN

    schemas = DOC["components"]["schemas"]
    assert set(schemas["PopInput"]["properties"]) == set(KNOWN)
    assert set(schemas["Pop"]["required"]) == set(KNOWN)
    validator(schemas["Pop"]).validate(schemas["Pop"]["example"])


def test_answers_match_the_schemas(hub: HubThread) -> None:
    listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
    listener.initialize(hub.address)
    listener.start_listening("13579")
    try:
        pop = {"media": "telephone", "resource": "13579", "source": "12345", "wait_time": 10}
        assert checked(hub, "POST", "/v1/pops", pop)[0] == 200
        status, answer = checked(hub, "POST", "/v1/pops", [pop, {**pop, "resource": "54321"}])
        assert status == 200 and answer["accepted"] == 2
        assert checked(hub, "POST", "/v1/pops", raw=b"{not json")[0] == 400
        status, answer = checked(hub, "POST", "/v1/pops", [pop, {**pop, "queue": "x"}])
        assert (status, answer["index"], answer["field"]) == (422, 1, "queue")
        assert checked(hub, "POST", "/v1/pops", raw=b" " * (1024 * 1024 + 1))[0] == 413

        contact = f"c-{uuid.uuid4().hex[:8]}"
        events = [
            {
                "contact_id": contact,
                "event": "queued",
                "source": "12345",
                "at": "2024-05-14T09:00:00Z",
            },
            {
                "contact_id": contact,
                "event": "routed",
                "resource": "13579",
                "at": "2024-05-14T09:00:10Z",
            },
        ]
        status, answer = checked(hub, "POST", "/v1/contacts", events)
        assert status == 200 and answer["applied"] == 2 and len(answer["pops"]) == 1
        status, answer = checked(
            hub, "POST", "/v1/contacts", [{"contact_id": contact, "event": "bogus"}]
        )
        assert (status, answer["error"], answer["index"]) == (422, "unknown_event", 0)
        assert checked(hub, "POST", "/v1/contacts", {"contact_id": 5, "event": "queued"})[0] == 400
        assert checked(hub, "POST", "/v1/contacts", raw=b"[1,")[0] == 400
        assert checked(hub, "POST", "/v1/contacts", raw=b" " * (1024 * 1024 + 1))[0] == 413

        status, answer = checked(hub, "GET", "/v1/status")
        assert status == 200 and answer["contacts"] == 1
        assert answer["listeners"] == [
            {"media": "telephone", "resource": "13579", "connections": 1}
        ]
        assert checked(hub, "GET", "/v1/health") == (
            200,
            {"status": "ok", "version": answer["version"]},
        )
        assert checked(hub, "GET", "/openapi.json")[0] == 200
    finally:
        listener.shutdown()


def test_bearer_tokens_as_documented() -> None:
    guarded = HubThread(token=LISTENER_TOKEN, source_token=SOURCE_TOKEN)
    try:
        pop = {"media": "email", "resource": "mmartin"}
        event = {"contact_id": "c-auth", "event": "queued", "media": "email"}
        for path, body in (("/v1/pops", pop), ("/v1/contacts", event)):
            security = DOC["paths"][path]["post"]["security"]
            assert {"bearerAuth": []} in security
            assert checked(guarded, "POST", path, body)[0] == 401
            assert checked(guarded, "POST", path, body, token="wrong")[0] == 401
            status, answer = checked(guarded, "POST", path, body, token=LISTENER_TOKEN)
            assert (status, answer["error"]) == (403, "forbidden")
            assert checked(guarded, "POST", path, body, token=SOURCE_TOKEN)[0] == 200
        assert checked(guarded, "GET", "/v1/status")[0] == 401
        assert checked(guarded, "GET", "/v1/status", token=LISTENER_TOKEN)[0] == 200
        assert checked(guarded, "GET", "/v1/status", token=SOURCE_TOKEN)[0] == 200
        for open_path in ("/v1/health", "/openapi.json"):
            assert DOC["paths"][open_path]["get"]["security"] == []
            assert checked(guarded, "GET", open_path)[0] == 200
    finally:
        guarded.close()


# Bodies the document and the hub must judge alike (True: accepted).
POPS = [
    ({"media": "telephone", "resource": "13579"}, True),
    (DOC["components"]["schemas"]["PopInput"]["example"], True),
    (
        [{"media": "callback", "resource": "jdupont"}, {"media": "email", "resource": "mmartin"}],
        True,
    ),
    ({"media": "webcollab", "resource": "x", "contact_data": {"k": "v"}, "wait_time": 3}, True),
    ({"resource": "13579"}, False),
    ({"media": "telephone"}, False),
    ({"media": "fax", "resource": "13579"}, False),
    ({"media": "telephone", "resource": "13579", "queue": "Ventes"}, False),
    ({"media": "telephone", "resource": ""}, False),
    ({"media": "telephone", "resource": "x" * 129}, False),
    ({"media": "telephone", "resource": "1", "wait_time": -1}, False),
    ({"media": "telephone", "resource": "1", "wait_time": True}, False),
    ({"media": "telephone", "resource": "1", "contact_data": ["a", "b"]}, False),
    ({"media": "telephone", "resource": "1", "contact_data": {"": "v"}}, False),
    ({"media": "telephone", "resource": "1", "source": "x" * 1025}, False),
    ({"media": "telephone", "resource": "1", "id": "x" * 129}, False),
    ([{"media": "telephone", "resource": "1"}, 5], False),
    ("a pop", False),
    # created_at: checked and normalised (issue 10)
    ({"media": "telephone", "resource": "1", "created_at": "not a time"}, False),
    ({"media": "telephone", "resource": "1", "created_at": "2024-05-14T11:00:00+02:00"}, True),
    ({"media": "telephone", "resource": "1", "created_at": 1715677200}, False),
    ({"media": "telephone", "resource": "1", "created_at": "2024-05-14t09:00:00z"}, True),
    ({"media": "telephone", "resource": "1", "created_at": "2024-13-14T09:00:00Z"}, False),
    # the one resource rule: invisible, space-like, C1, private use refused; unassigned allowed
    ({"media": "telephone", "resource": "13\u00a0579"}, False),
    ({"media": "telephone", "resource": "13\u00ad579"}, False),
    ({"media": "telephone", "resource": "13\u200d579"}, False),
    ({"media": "telephone", "resource": "13\u2028579"}, False),
    ({"media": "telephone", "resource": "13\u0085579"}, False),
    ({"media": "telephone", "resource": "13\ue000579"}, False),
    ({"media": "telephone", "resource": "13\U000f0000"}, False),
    ({"media": "telephone", "resource": "13579\n"}, False),
    ({"media": "telephone", "resource": "\t13579"}, False),
    ({"media": "telephone", "resource": "13\u0378579"}, True),
    ({"media": "telephone", "resource": "Jean Dupont-Éluard"}, True),
    ({"media": "telephone", "resource": "  13579  "}, True),
    ({"media": "telephone", "resource": "  " + "x" * 128 + "  "}, True),
    ({"media": "telephone", "resource": "x" * 128}, True),
    # media: any ASCII case, spaces around
    ({"media": " Telephone ", "resource": "1"}, True),
    ({"media": "EMAIL", "resource": "1"}, True),
    ({"media": "callbac\u212a", "resource": "1"}, False),
    ({"media": "\ttelephone", "resource": "1"}, False),
    ({"media": "telephone\n", "resource": "1"}, False),
    # leniencies: null is absent, numbers are text
    (
        {
            "media": "telephone",
            "resource": "1",
            "id": None,
            "contact_id": None,
            "created_at": None,
            "source": None,
            "wait_time": None,
            "contact_data": None,
        },
        True,
    ),
    (
        {
            "media": "telephone",
            "resource": "1",
            "source": 12345,
            "contact_id": 7,
            "contact_data": {"n": 1.5},
        },
        True,
    ),
    ({"media": "telephone", "resource": "1", "source": True}, False),
    ({"media": "telephone", "resource": "1", "contact_data": {"n": False}}, False),
    ({"media": "telephone", "resource": "1", "queue": None}, False),
    ({"media": "telephone", "resource": "1", "wait_time": 2.5}, True),
    # id 128, contact_id 256
    ({"media": "telephone", "resource": "1", "id": "x" * 128}, True),
    ({"media": "telephone", "resource": "1", "contact_id": "c" * 256}, True),
    ({"media": "telephone", "resource": "1", "contact_id": "c" * 257}, False),
]
EVENTS = [
    ({"event": "queued", "media": "email", "source": "a@b", "contact_data": {"k": "v"}}, True),
    (
        {"event": "routed", "resource": "13579", "source": "12345", "at": "2024-05-14T09:00:00Z"},
        True,
    ),
    ({"event": "hung_up"}, False),
    ({"event": "routed"}, False),
    ({"event": "routed", "resource": ""}, False),
    ({"event": "routed", "resource": 13579}, False),
    ({"event": "queued", "queue": "Ventes"}, False),
    ({"event": "queued", "resource": "13579"}, False),
    ({"event": "queued", "media": "fax"}, False),
    ({"event": "queued", "contact_data": {"k": 1}}, False),
    ({"event": "queued", "source": 12345}, False),
    ({"event": "queued", "source": "x" * 1025}, False),
    ({"event": "queued", "at": 1715677200}, False),
    ({"event": "queued", "contact_id": ""}, False),
    ({"event": "queued", "contact_id": 7}, False),
    ({"contact_id": "no-event"}, False),
    # one contact_data rule with /v1/pops: an empty key is refused
    ({"event": "queued", "contact_data": {"": "v"}}, False),
    ({"event": "queued", "contact_data": {"k" * 4096: "v" * 4096}}, True),
    # null counts as absent, also for a field the event does not take
    ({"event": "queued", "source": None, "media": None, "at": None, "contact_data": None}, True),
    ({"event": "queued", "queue": None, "resource": None}, True),
    ({"event": "routed", "resource": None}, False),
    # the resource and media rules of /v1/pops and the listener port
    ({"event": "routed", "resource": "13\u00a0579"}, False),
    ({"event": "routed", "resource": "13\u0378579"}, True),
    ({"event": "routed", "resource": " 13579 "}, True),
    ({"event": "queued", "media": " EMAIL "}, True),
    ({"event": "queued", "media": "callbac\u212a"}, False),
    ({"event": "queued", "at": "not a time"}, False),
    ({"event": "queued", "at": "2024-05-14t09:00:00z"}, True),
    ({"event": "queued", "at": "2024-05-14T09:00:00+02:00"}, True),
    ({"event": "queued", "contact_id": "c" * 257}, False),
]


@pytest.mark.parametrize("body, accepted", POPS, ids=[f"pop{i}" for i in range(len(POPS))])
def test_pop_schema_judges_like_the_hub(hub: HubThread, body: Any, accepted: bool) -> None:
    schema_says = validator(request_schema("/v1/pops")).is_valid(body)
    status, _ = checked(hub, "POST", "/v1/pops", body)
    assert (schema_says, status == 200) == (accepted, accepted)


@pytest.mark.parametrize("event, accepted", EVENTS, ids=[f"event{i}" for i in range(len(EVENTS))])
def test_contact_event_schema_judges_like_the_hub(
    hub: HubThread, event: dict[str, Any], accepted: bool
) -> None:
    body = {"contact_id": f"c-{uuid.uuid4().hex[:8]}", **event}
    schema_says = validator(request_schema("/v1/contacts")).is_valid(body)
    status, _ = checked(hub, "POST", "/v1/contacts", body)
    assert (schema_says, status == 200) == (accepted, accepted)
