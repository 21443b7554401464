"""The webhook source inside a real hub, driven by the worked Amazon Connect mapping shipped in
examples/amazon-connect.toml: EventBridge-shaped contact events over real HTTP become pops on real
listeners. One test per row of docs/sources/webhooks.md's Amazon Connect table, the four media, a
transfer, secrets and HMAC, retried deliveries, malformed bodies, and mappings refused at start."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from hubproc import run
from sourcekit import Desk, source_hub
from spop_cli.cli import cli
from spop_cli.sources import SourceError
from spop_cli.sources.webhook import Template, WebhookSource

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "amazon-connect.toml"
DATA = json.loads((Path(__file__).parent / "data" / "amazon_connect_events.json").read_text())
CALL, TRANSFER, OTHER = DATA["call"], DATA["transfer"], DATA["other"]
SECRET = "eventbridge-api-key-0123456789"
CONTACT = CALL["INITIATED"]["detail"]["contactId"]


def connect_table() -> dict[str, Any]:
    """The shipped mapping, with the secret given inline instead of from the environment."""
    table = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))["sources"]["connect"]
    del table["secret_env"]
    return {**table, "secret": SECRET}


class EventBridge:
    """Posts events as an API destination does: JSON, the connection's API key header."""

    def __init__(
        self, hub: Any, session: aiohttp.ClientSession, path: str = "/v1/sources/connect/events"
    ) -> None:
        self.url = f"http://127.0.0.1:{hub.http_port}{path}"
        self.session = session

    async def post(
        self, body: Any, headers: dict[str, str] | None = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", "X-Spop-Secret": SECRET, **(headers or {})}
        async with self.session.post(self.url, data=data, headers=sent) as response:
            return response.status, await response.json()

    async def play(self, *events: dict[str, Any]) -> list[Any]:
        answers = []
        for event in events:
            status, answer = await self.post(event)
            assert status == 200, (event["detail"]["eventType"], status, answer)
            answers.append(answer)
        return answers


async def scenario(table: dict[str, Any], listen: list[tuple[str, str]], body: Any) -> Any:
    async with source_hub("connect", table) as hub, aiohttp.ClientSession() as session:
        desk = Desk(hub)
        for media, resource in listen:
            await desk.listen(media, resource)
        try:
            return await body(hub, desk, EventBridge(hub, session))
        finally:
            await desk.close()


def plays(
    *events: dict[str, Any],
    count: int,
    listen: tuple[tuple[str, str], ...] = (("telephone", "13579"),),
) -> Any:
    async def body(hub: Any, desk: Desk, bridge: EventBridge) -> Any:
        answers = await bridge.play(*events)
        return await desk.settled(hub, count), answers, hub.status()

    return run(scenario(connect_table(), list(listen), body))


def changed(event: dict[str, Any], **detail: Any) -> dict[str, Any]:
    event = copy.deepcopy(event)
    event["detail"].update(detail)
    return event


# --- the Amazon Connect table, row by row -----------------------------------------------------------


def test_initiated_is_queued_and_pops_nobody() -> None:
    pops, answers, status = plays(CALL["INITIATED"], count=0)
    assert answers == [{"applied": 1, "pops": [], "matched": ["initiated"]}]
    assert pops == [] and status["contacts"] == 1


def test_queued_starts_the_wait_at_the_enqueue_time() -> None:
    pops, answers, _ = plays(CALL["INITIATED"], CALL["QUEUED"], CALL["CONNECTED_TO_AGENT"], count=1)
    assert answers[1] == {"applied": 2, "pops": [], "matched": ["queued"]}
    # 12 s in the queue (09:00:20 → 09:00:32), not the 32 s since the call came in
    assert (pops[0]["wait_time"], pops[0]["queue_name"]) == (12, "Ventes")


def test_connected_to_agent_pops_the_agent_by_arn() -> None:
    pops, answers, _ = plays(CALL["INITIATED"], CALL["QUEUED"], CALL["CONNECTED_TO_AGENT"], count=1)
    event_id = CALL["CONNECTED_TO_AGENT"]["id"]
    assert answers[2] == {"applied": 2, "pops": [f"{event_id}:routed"], "matched": ["connected"]}
    assert {k: v for k, v in pops[0].items()} == {
        "id": f"{event_id}:routed",
        "media": "telephone",
        "resource": "13579",
        "contact_id": CONTACT,
        "created_at": "2024-05-14T09:00:32.000Z",
        "source": "",
        "destination": "",
        "queue_name": "Ventes",
        "contact_description": "",
        "from": "",
        "redirect": "",
        "wait_time": 12,
        "contact_data": {
            "channel": "VOICE",
            "initiation_method": "INBOUND",
            "initial_contact_id": CONTACT,
        },
    }


@pytest.mark.parametrize("length", [247, 248])
def test_an_id_event_list_id_over_256_characters_becomes_its_digest(length: int) -> None:
    """The connected rule makes `ID:routed` and `ID:answered`: 256 characters at most from an id
    of 247 (kept), 257 from 248: the hub refused that `answered` (422 for the whole delivery),
    so its id is now its digest. The pop's id is the digest of `ID:routed` either way (a pop id
    longer than 128 characters is one, contacts.md)."""
    connected = {**copy.deepcopy(CALL["CONNECTED_TO_AGENT"]), "id": "x" * length}
    pops, answers, _ = plays(CALL["INITIATED"], CALL["QUEUED"], connected, count=1)
    joined = "x" * length + ":routed"
    pop_id = "sha256:" + hashlib.sha256(joined.encode()).hexdigest()[:32]
    assert answers[2] == {"applied": 2, "pops": [pop_id], "matched": ["connected"]}
    assert pops[0]["id"] == pop_id


def test_disconnected_ends_the_contact_and_withdraws_an_undelivered_pop() -> None:
    async def body(hub: Any, desk: Desk, bridge: EventBridge) -> Any:
        await bridge.play(CALL["INITIATED"], CALL["QUEUED"], CALL["CONNECTED_TO_AGENT"])
        assert hub.status()["pending"] == 1  # the agent's desktop is not up
        answers = await bridge.play(CALL["DISCONNECTED"])
        status = hub.status()
        await desk.listen("telephone", "13579")
        return answers, status, await desk.settled(hub, 0)

    answers, status, pops = run(scenario(connect_table(), [], body))
    assert answers == [{"applied": 1, "pops": [], "matched": ["disconnected"]}]
    assert (status["pending"], status["counters"]["withdrawn"], pops) == (0, 1, [])


def test_a_disconnect_for_a_contact_never_seen_is_answered_200() -> None:
    _, answers, _ = plays(OTHER["DISCONNECTED_LEGACY_CASE"], count=0)
    assert answers == [{"applied": 0, "pops": [], "matched": ["disconnected"]}]


def test_an_event_no_rule_matches_is_answered_and_ignored() -> None:
    _, answers, status = plays(OTHER["CONNECTED_TO_SYSTEM"], count=0)
    assert answers == [{"applied": 0, "pops": [], "matched": []}] and status["contacts"] == 0


def test_queued_before_initiated_still_pops_with_the_queue_wait() -> None:
    async def body(hub: Any, desk: Desk, bridge: EventBridge) -> Any:
        await bridge.play(CALL["QUEUED"])  # EventBridge does not promise order
        late = await bridge.post(CALL["INITIATED"])
        await bridge.play(CALL["CONNECTED_TO_AGENT"])
        return late, await desk.settled(hub, 1)

    (status, answer), pops = run(scenario(connect_table(), [("telephone", "13579")], body))
    assert (status, answer["error"], answer["rule"]) == (422, "time_backwards", "initiated")
    assert (pops[0]["wait_time"], pops[0]["media"]) == (12, "telephone")


def test_connected_after_disconnected_is_refused() -> None:
    async def body(hub: Any, desk: Desk, bridge: EventBridge) -> Any:
        await bridge.play(CALL["INITIATED"], CALL["QUEUED"], CALL["DISCONNECTED"])
        return await bridge.post(CALL["CONNECTED_TO_AGENT"]), hub.status()

    (status, answer), hub_status = run(scenario(connect_table(), [], body))
    assert (status, answer["error"], answer["rule"]) == (422, "contact_ended", "connected")
    assert hub_status["pending"] == 0


# --- media, transfers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "method", "media"),
    [
        ("VOICE", "INBOUND", "telephone"),
        ("CHAT", "API", "webcollab"),
        ("TASK", "API", "webcollab"),
        ("EMAIL", "INBOUND", "email"),
        ("VOICE", "CALLBACK", "callback"),
    ],
)
def test_the_channel_gives_the_media(channel: str, method: str, media: str) -> None:
    events = [
        changed(CALL[k], channel=channel, initiationMethod=method)
        for k in ("INITIATED", "QUEUED", "CONNECTED_TO_AGENT")
    ]
    pops, _, _ = plays(*events, count=1, listen=((media, "13579"),))
    assert (pops[0]["media"], pops[0]["contact_data"]["channel"]) == (media, channel)


def test_a_transfer_is_a_new_contact_that_pops_the_second_agent() -> None:
    pops, _, _ = plays(
        CALL["INITIATED"],
        CALL["QUEUED"],
        CALL["CONNECTED_TO_AGENT"],
        TRANSFER["INITIATED"],
        TRANSFER["QUEUED"],
        TRANSFER["CONNECTED_TO_AGENT"],
        count=2,
        listen=(("telephone", "13579"), ("telephone", "54321")),
    )
    second = pops[1]
    assert (
        second["resource"],
        second["contact_id"],
        second["queue_name"],
        second["wait_time"],
    ) == ("54321", TRANSFER["INITIATED"]["detail"]["contactId"], "Connect", 8)
    assert second["contact_data"] == {
        "channel": "VOICE",
        "initiation_method": "TRANSFER",
        "initial_contact_id": CONTACT,
        "previous_contact_id": CONTACT,
    }


# --- retries, authentication, malformed bodies ----------------------------------------------------


def test_a_retried_delivery_gives_one_pop() -> None:
    pops, answers, status = plays(
        CALL["INITIATED"],
        CALL["QUEUED"],
        CALL["CONNECTED_TO_AGENT"],
        CALL["CONNECTED_TO_AGENT"],
        count=1,
    )
    assert answers[3] == {"applied": 2, "pops": [], "matched": ["connected"]}
    assert len(pops) == 1 and status["counters"]["duplicate_events"] == 2


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-Spop-Secret": ""}, "missing X-Spop-Secret"),
        ({"X-Spop-Secret": "guess"}, "wrong X-Spop-Secret"),
    ],
)
def test_a_request_without_the_secret_is_refused_403(headers: dict[str, str], message: str) -> None:
    async def body(hub: Any, desk: Desk, bridge: EventBridge) -> Any:
        return await bridge.post(CALL["INITIATED"], headers), hub.status()

    (status, answer), hub_status = run(scenario(connect_table(), [], body))
    assert (status, answer) == (403, {"error": "forbidden", "message": message})
    assert hub_status["contacts"] == 0


def test_an_hmac_signed_body_is_checked() -> None:
    table = {**connect_table(), "hmac_secret": "hmac-key", "hmac_header": "X-Signature"}
    raw = json.dumps(CALL["INITIATED"]).encode()
    good = "sha256=" + hmac.new(b"hmac-key", raw, hashlib.sha256).hexdigest()
    bad = "sha256=" + hmac.new(b"hmac-key", raw + b" ", hashlib.sha256).hexdigest()

    async def body(hub: Any, desk: Desk, bridge: EventBridge) -> Any:
        return [
            (await bridge.post(None, {"X-Signature": bad}, raw))[0],
            (await bridge.post(None, {}, raw))[0],
            (await bridge.post(None, {"X-Signature": good}, raw))[0],
        ]

    assert run(scenario(table, [], body)) == [403, 403, 200]


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (b'{"detail": ', 400, "invalid_json"),
        (b'"INITIATED"', 400, "not_an_object"),
        (b"[1, 2]", 400, "not_an_object"),
        (b"\xff\xfe", 400, "invalid_json"),
    ],
)
def test_a_malformed_body_is_a_clear_400_and_the_connection_keeps_serving(
    raw: bytes, status: int, error: str
) -> None:
    async def body(hub: Any, desk: Desk, bridge: EventBridge) -> Any:
        await bridge.play(CALL["INITIATED"], CALL["QUEUED"])
        bad = await bridge.post(None, raw=raw)
        await bridge.play(CALL["CONNECTED_TO_AGENT"])  # the same keep-alive connection
        return bad, await desk.settled(hub, 1)

    (got, answer), pops = run(scenario(connect_table(), [("telephone", "13579")], body))
    assert (got, answer["error"]) == (status, error)
    assert [p["resource"] for p in pops] == ["13579"]


def test_an_agent_not_in_the_table_is_refused_naming_the_rule() -> None:
    stranger = copy.deepcopy(CALL["CONNECTED_TO_AGENT"])
    stranger["detail"]["agentInfo"]["agentArn"] += "-unknown"

    async def body(hub: Any, desk: Desk, bridge: EventBridge) -> Any:
        await bridge.play(CALL["INITIATED"], CALL["QUEUED"])
        return await bridge.post(stranger)

    status, answer = run(scenario(connect_table(), [], body))
    assert (status, answer["error"], answer["field"], answer["index"], answer["rule"]) == (
        422,
        "missing_field",
        "resource",
        0,
        "connected",
    )


# --- templates ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("{/a~1b/c~0d}", "slash-tilde"),
        ("{/list/1}", "second"),
        ("{/missing || /list/0}", "first"),
        ("{/n}", "42"),
        ("{/flag}", "true"),
        ("{/obj}", '{"k": "v"}'),
        ("{/word|upper}", "VOICE"),
        ("{/word|upper|t}", "telephone"),
        ("{/other|t}", "fallback"),
        ("call {/n} of {/missing}", "call 42 of "),
        ("{{literal}}", "{literal}"),
        ("{/missing}", None),
    ],
)
def test_a_template_renders_pointers_filters_and_alternatives(text: str, value: str | None) -> None:
    document = {
        "a/b": {"c~d": "slash-tilde"},
        "list": ["first", "second"],
        "n": 42,
        "flag": True,
        "obj": {"k": "v"},
        "word": "Voice",
        "other": "X",
    }
    template = Template(text, {"t": {"VOICE": "telephone", "*": "fallback"}}, "fields.x")
    assert template.render(document) == value


# --- the mapping refused at start -----------------------------------------------------------------


def rules_with(index: int, **changes: Any) -> dict[str, Any]:
    table = connect_table()
    table["rules"][index] = {**table["rules"][index], **changes}
    return table


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        (rules_with(2, event="popped"), "rules[2].event", "unknown event 'popped'"),
        (
            rules_with(1, fields={"queue_name": "{/detail/queueInfo/queueArn|queus}"}),
            "rules[1].fields.queue_name",
            "no filter or table 'queus'",
        ),
        (
            rules_with(0, when={"detail/eventType": "INITIATED"}),
            "rules[0].when.detail/eventType",
            "not a JSON pointer",
        ),
        (
            rules_with(2, fields={"at": "{/time}"}),
            "rules[2].fields.resource",
            "routed needs a resource",
        ),
        (
            rules_with(0, fields={"resource": "{/x}"}),
            "rules[0].fields.resource",
            "queued does not take resource",
        ),
        (rules_with(3, name="queued"), "rules[3].name", "rule name 'queued' is used twice"),
        (rules_with(1, fields={"at": "{/time"}), "rules[1].fields.at", "unbalanced '{'"),
        (rules_with(1, colour="blue"), "rules[1].colour", "unknown key"),
        ({**connect_table(), "secret": None}, "secret", "no secret"),
        ({**connect_table(), "rules": []}, "rules", "non-empty array"),
    ],
)
def test_a_mapping_with_an_error_names_the_rule_at_fault(
    table: dict[str, Any], key: str, message: str
) -> None:
    table = {k: v for k, v in table.items() if v is not None and k != "type"}
    with pytest.raises(SourceError) as caught:
        WebhookSource(table)
    assert caught.value.key == key and message in caught.value.message


def test_the_shipped_example_passes_config_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOP_CONNECT_SECRET", SECRET)
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(EXAMPLE)])
    assert result.exit_code == 0, result.output


def test_config_check_and_serve_name_the_rule_at_fault(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8").replace('event = "ended"', 'event = "hung_up"')
    text = text.replace('secret_env = "SPOP_CONNECT_SECRET"', f'secret = "{SECRET}"')
    config = tmp_path / "spop.toml"
    config.write_text(text, encoding="utf-8")
    expected = "sources.connect.rules[3].event = \"hung_up\": unknown event 'hung_up'"

    checked = CliRunner().invoke(cli, ["config", "check", "--config", str(config)])
    served = subprocess.run(
        [
            sys.executable,
            "-m",
            "spop_cli",
            "serve",
            "--config",
            str(config),
            "--no-journal",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert checked.exit_code == 12 and checked.output.startswith(expected), checked.output
    assert served.returncode == 12
    assert (
        "sources.connect.rules[3].event: unknown event 'hung_up'" in served.stdout + served.stderr
    )
