"""The twilio source inside a real hub: signed TaskRouter callbacks over real HTTP become pops on
real listeners. One test per row of docs/sources/twilio.md's mapping table, the four media, the
signature checks, retried callbacks and malformed ones."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from click.testing import CliRunner

from hubproc import run
from sourcekit import Desk, source_hub
from spop_cli.cli import cli

DATA = json.loads((Path(__file__).parent / "data" / "twilio_taskrouter.json").read_text())
EVENTS: dict[str, dict[str, str]] = DATA["events"]
TOKEN = "f3e1c0ffee0123456789abcdef012345"
TABLE = {"type": "twilio", "auth_token": TOKEN}
TASK = EVENTS["task.created"]["TaskSid"]
T0 = "2024-05-14T09:00:0"


def sign(url: str, params: dict[str, str], token: str = TOKEN) -> str:
    """Twilio's documented algorithm, written out here apart from the source's own."""
    text = url + "".join(f"{key}{params[key]}" for key in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), text.encode(), hashlib.sha1).digest()).decode()


def event(name: str, **changes: str) -> dict[str, str]:
    params = copy.deepcopy(EVENTS[name])
    params.update(changes)
    return params


class TaskRouter:
    """Posts callbacks to the source as TaskRouter would: form-encoded, signed for `url`."""

    def __init__(
        self, hub: Any, session: aiohttp.ClientSession, path: str = "/v1/sources/tw/events"
    ) -> None:
        self.url = f"http://127.0.0.1:{hub.http_port}{path}"
        self.session = session

    async def post(
        self, params: dict[str, str], *, signature: str | None = "auto", url: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signature == "auto":
            signature = sign(url or self.url, params)
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        async with self.session.post(self.url, data=urlencode(params), headers=headers) as response:
            text = await response.text()
            return response.status, (json.loads(text) if text else None)

    async def play(self, *names: str) -> None:
        for name in names:
            status, body = await self.post(event(name))
            assert status == 204, (name, status, body)


async def scenario(table: dict[str, Any], listen: list[tuple[str, str]], body: Any) -> Any:
    async with source_hub("tw", table) as hub, aiohttp.ClientSession() as session:
        desk = Desk(hub)
        for media, resource in listen:
            await desk.listen(media, resource)
        try:
            return await body(hub, desk, TaskRouter(hub, session))
        finally:
            await desk.close()


def plays(
    *names: str, count: int, listen: tuple[tuple[str, str], ...] = (("telephone", "13579"),)
) -> Any:
    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        await router.play(*names)
        return await desk.settled(hub, count), hub.status()

    return run(scenario(TABLE, list(listen), body))


# --- the mapping table, row by row ----------------------------------------------------------------


def test_task_created_is_queued_and_pops_nobody() -> None:
    pops, status = plays("task.created", count=0)
    assert pops == [] and status["contacts"] == 1 and status["counters"]["contact_events"] == 1


@pytest.mark.parametrize("kind", ["task-queue.entered", "task-queue.moved"])
def test_entering_a_queue_is_queued_with_the_queue_name(kind: str) -> None:
    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        await router.play("task.created")
        assert (await router.post(event("task-queue.entered", EventType=kind)))[0] == 204
        # a reservation without the queue's name: the pop shows the one the task entered
        assert (await router.post(event("reservation.created", TaskQueueName="")))[0] == 204
        return await desk.settled(hub, 1)

    pops = run(scenario(TABLE, [("telephone", "13579")], body))
    assert pops[0]["queue_name"] == "Ventes"


def test_reservation_created_pops_the_worker_with_the_task() -> None:
    pops, _ = plays("task.created", "task-queue.entered", "reservation.created", count=1)
    pop = pops[0]
    assert {k: v for k, v in pop.items() if k != "id"} == {
        "media": "telephone",
        "resource": "13579",
        "contact_id": TASK,
        "created_at": "2024-05-14T09:00:10.000Z",
        "source": "+33123456789",
        "destination": "+33198765432",
        "queue_name": "Ventes",
        "contact_description": "",
        "from": "",
        "redirect": "",
        "wait_time": 10,
        "contact_data": {
            "type": "inbound",
            "from": "+33123456789",
            "to": "+33198765432",
            "direction": "inbound",
            "call_sid": "CA" + "1" * 32,
            "account": "C-1042",
            "customer": '{"tier": "gold"}',
        },
    }
    # the pop id derives from the event sid
    assert pop["id"] == EVENTS["reservation.created"]["Sid"]


def test_reservation_created_without_task_created_still_counts_the_wait() -> None:
    pops, _ = plays("reservation.created", count=1)  # the events filter left task.created out
    assert (pops[0]["resource"], pops[0]["wait_time"], pops[0]["source"]) == (
        "13579",
        10,
        "+33123456789",
    )


def test_reservation_accepted_is_answered_and_stops_the_wait() -> None:
    pops, _ = plays(
        "task.created",
        "reservation.created",
        "reservation.accepted",
        "reservation.created.transfer",
        count=2,
        listen=(("telephone", "13579"), ("telephone", "bob")),
    )
    assert [(p["resource"], p["wait_time"]) for p in pops] == [("13579", 10), ("bob", 15)]


def test_a_new_reservation_on_an_accepted_task_is_a_transfer() -> None:
    pops, _ = plays(
        "task.created",
        "reservation.created",
        "reservation.accepted",
        "reservation.created.transfer",
        count=2,
        listen=(("telephone", "13579"), ("telephone", "bob")),
    )
    transfer = pops[1]
    assert (transfer["resource"], transfer["from"], transfer["created_at"]) == (
        "bob",
        "13579",
        "2024-05-14T09:00:40.000Z",
    )
    assert transfer["id"] == EVENTS["reservation.created.transfer"]["Sid"]


def test_a_transfer_made_as_a_new_task_continues_the_contact() -> None:
    """Twilio's blind-transfer pattern: a new task naming the original one, then the original
    task completed; the contact goes on until the new task ends."""
    second = "WT" + "8" * 32
    attributes = json.dumps({"original_task_sid": TASK, "type": "transfer"})

    def of_second(name: str, sid: str, **changes: str) -> dict[str, str]:
        return event(name, TaskSid=second, TaskAttributes=attributes, Sid=sid, **changes)

    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        await router.play("task.created", "reservation.created", "reservation.accepted")
        steps = [
            of_second(
                "task.created", "EV" + "a1" * 16, Timestamp=str(1715677200 + 60), TaskAge="0"
            ),
            event("task.completed", Timestamp=str(1715677200 + 61)),  # the original, while moving
            of_second(
                "reservation.created.transfer", "EV" + "a2" * 16, Timestamp=str(1715677200 + 70)
            ),
            of_second(
                "reservation.accepted.transfer", "EV" + "a3" * 16, Timestamp=str(1715677200 + 72)
            ),
        ]
        for params in steps:
            assert (await router.post(params))[0] == 204
        pops = await desk.settled(hub, 2)
        before_end = hub.status()["contacts"]
        done = await router.post(
            of_second("task.completed", "EV" + "a4" * 16, Timestamp=str(1715677200 + 200))
        )
        late = await router.post(
            event("reservation.accepted.transfer", Timestamp=str(1715677200 + 201))
        )
        return pops, before_end, done[0], late

    pops, contacts, done, (late_status, late) = run(
        scenario(TABLE, [("telephone", "13579"), ("telephone", "bob")], body)
    )
    transfer = pops[1]
    assert (transfer["contact_id"], transfer["resource"], transfer["from"]) == (
        TASK,
        "bob",
        "13579",
    )
    assert (transfer["source"], transfer["wait_time"]) == ("+33123456789", 10)
    assert transfer["contact_data"]["original_task_sid"] == TASK
    assert (contacts, done) == (1, 204)
    assert (late_status, late["error"]) == (422, "contact_ended")  # the new task's end ended it


@pytest.mark.parametrize("refusal", ["reservation.rejected", "reservation.timeout"])
def test_a_transfer_turned_down_is_recalled_to_the_worker_who_had_it(refusal: str) -> None:
    pops, _ = plays(
        "task.created",
        "reservation.created",
        "reservation.accepted",
        "reservation.created.transfer",
        refusal,
        count=3,
        listen=(("telephone", "13579"), ("telephone", "bob")),
    )
    assert [(p["resource"], p["from"]) for p in pops] == [
        ("13579", ""),
        ("bob", "13579"),
        ("13579", ""),
    ]
    assert (pops[2]["created_at"], pops[2]["wait_time"]) == ("2024-05-14T09:00:50.000Z", 15)


@pytest.mark.parametrize("refusal", ["reservation.rejected", "reservation.timeout"])
def test_a_first_offer_turned_down_pops_nobody_more(refusal: str) -> None:
    first_offer = {k: v for k, v in event(refusal).items()}
    first_offer["ReservationSid"] = first_offer["ResourceSid"] = EVENTS["reservation.created"][
        "ReservationSid"
    ]
    first_offer.update(
        {
            k: EVENTS["reservation.created"][k]
            for k in ("WorkerSid", "WorkerName", "WorkerAttributes")
        }
    )

    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        await router.play("task.created", "reservation.created")
        assert (await router.post(first_offer))[0] == 204
        return await desk.settled(hub, 1)

    pops = run(scenario(TABLE, [("telephone", "13579")], body))
    assert [p["resource"] for p in pops] == ["13579"]


def test_a_task_cancelled_while_ringing_withdraws_the_pop_not_delivered() -> None:
    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        await router.play("task.created", "reservation.created")
        assert hub.status()["pending"] == 1  # ringing at 13579, whose desktop is not up yet
        await router.play("task.canceled")
        status = hub.status()
        await desk.listen("telephone", "13579")
        return await desk.settled(hub, 0), status

    pops, status = run(scenario(TABLE, [], body))
    assert pops == [] and status["pending"] == 0 and status["counters"]["withdrawn"] == 1


@pytest.mark.parametrize("end", ["task.canceled", "task.completed", "task.wrapup", "task.deleted"])
def test_task_end_events_end_the_contact(end: str) -> None:
    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        await router.play("task.created")
        assert (await router.post(event("task.completed", EventType=end)))[0] == 204
        # a late reservation for the ended task is refused by the hub: the contact is over
        return await router.post(
            event("reservation.accepted", Timestamp=EVENTS["task.completed"]["Timestamp"])
        )

    status, answer = run(scenario(TABLE, [], body))
    assert (status, answer["error"], answer["index"]) == (422, "contact_ended", 0)


def test_wrapup_then_completed_both_answer_204() -> None:
    pops, status = plays("task.created", "task.wrapup", "task.completed", count=0)
    assert status["counters"]["contact_events"] == 2  # the second end: already over, not an error


@pytest.mark.parametrize("name", ["task.updated", "worker.activity.update"])
def test_other_events_are_answered_and_ignored(name: str) -> None:
    pops, status = plays(name, count=0)
    assert status["counters"].get("contact_events", 0) == 0 and status["contacts"] == 0


# --- media ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "attributes", "media", "source", "destination"),
    [
        (
            "voice",
            {"from": "+33123456789", "to": "+33198765432"},
            "telephone",
            "+33123456789",
            "+33198765432",
        ),
        ("chat", {"from": "visitor-42", "to": "Sales"}, "webcollab", "visitor-42", "Sales"),
        (
            "sms",
            {"from": "+33611223344", "to": "+33198765432"},
            "webcollab",
            "+33611223344",
            "+33198765432",
        ),
        (
            "email",
            {"from": "client@example.org", "to": "ventes@example.com"},
            "email",
            "client@example.org",
            "ventes@example.com",
        ),
        ("voice", {"type": "callback", "from": "+33612345678"}, "callback", "", "+33612345678"),
    ],
)
def test_the_channel_gives_the_media(
    channel: str, attributes: dict[str, str], media: str, source: str, destination: str
) -> None:
    changes = {"TaskChannelUniqueName": channel, "TaskAttributes": json.dumps(attributes)}

    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        for name in ("task.created", "reservation.created"):
            assert (await router.post(event(name, **changes)))[0] == 204
        return await desk.settled(hub, 1)

    [pop] = run(scenario(TABLE, [(media, "13579")], body))
    assert (pop["media"], pop["source"], pop["destination"]) == (media, source, destination)


def test_media_and_resource_are_configurable() -> None:
    table = {
        **TABLE,
        "media": {"video": "telephone"},
        "resource_attributes": ["contact_uri"],
        "strip_prefixes": [],
    }

    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        for name in ("task.created", "reservation.created"):
            assert (await router.post(event(name, TaskChannelUniqueName="video")))[0] == 204
        return await desk.settled(hub, 1)

    [pop] = run(scenario(table, [("telephone", "client:alice")], body))
    assert (pop["media"], pop["resource"]) == ("telephone", "client:alice")


def test_a_worker_without_the_attribute_is_refused_by_name() -> None:
    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        await router.play("task.created")
        return await router.post(event("reservation.created", WorkerAttributes="{}"))

    status, answer = run(scenario(TABLE, [], body))
    assert status == 422 and answer["error"] == "no_resource"
    assert answer["message"].startswith(
        f"worker {EVENTS['reservation.created']['WorkerSid']} has none of"
    )


# --- signatures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("unsigned", "unsigned"),
        ("wrong token", "bad_signature"),
        ("tampered", "bad_signature"),
        ("other url", "bad_signature"),
    ],
)
def test_a_request_not_signed_with_the_token_is_refused_403(
    case: str, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    params = event("reservation.created")

    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        if case == "unsigned":
            answer = await router.post(params, signature=None)
        elif case == "wrong token":
            answer = await router.post(params, signature=sign(router.url, params, "0" * 32))
        elif case == "tampered":
            answer = await router.post(
                {**params, "WorkerAttributes": '{"extension": "666"}'},
                signature=sign(router.url, params),
            )
        else:
            answer = await router.post(params, url=router.url.replace("/tw/", "/other/"))
        return answer, hub.status()

    caplog.set_level("WARNING")
    (status, answer), hub_status = run(scenario(TABLE, [], body))
    assert (status, answer["error"]) == (403, error)
    assert hub_status["contacts"] == 0
    assert any("twilio: refused" in r.getMessage() for r in caplog.records)
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


def test_public_url_is_the_url_twilio_signed_behind_a_proxy() -> None:
    table = {**TABLE, "public_url": "https://spop.example.com/pbx"}

    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        signed_for = "https://spop.example.com/pbx/v1/sources/tw/events"
        as_seen = await router.post(event("task.created"))  # signed for the URL this hub sees
        proxied = await router.post(event("task.created"), url=signed_for)
        with_port = await router.post(
            event("task-queue.entered"), url=signed_for.replace(".com/", ".com:443/")
        )
        return as_seen[0], proxied[0], with_port[0]

    assert run(scenario(table, [], body)) == (403, 204, 204)


def test_the_auth_token_may_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOP_TEST_TWILIO", TOKEN)

    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        return (await router.post(event("task.created")))[0]

    assert run(scenario({"type": "twilio", "auth_token_env": "SPOP_TEST_TWILIO"}, [], body)) == 204


# --- retries, malformed bodies --------------------------------------------------------------------


def test_a_retried_callback_gives_one_pop() -> None:
    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        await router.play(
            "task.created", "reservation.created", "reservation.created", "task.created"
        )
        return await desk.settled(hub, 1), hub.status()

    pops, status = run(scenario(TABLE, [("telephone", "13579")], body))
    assert len(pops) == 1
    assert status["counters"]["duplicate_events"] == 2


@pytest.mark.parametrize(
    ("params", "content_type", "status", "error"),
    [
        (
            {"EventType": "task.created", "TaskSid": TASK, "TaskAttributes": "{not json"},
            None,
            400,
            "bad_attributes",
        ),
        (
            {"EventType": "task.created", "TaskSid": TASK, "TaskAttributes": "[1]"},
            None,
            400,
            "bad_attributes",
        ),
        ({"TaskSid": TASK}, None, 400, "missing_parameter"),
        ({"EventType": "reservation.accepted"}, None, 400, "missing_parameter"),
        (
            {"EventType": "task.created", "TaskSid": TASK, "Timestamp": "yesterday"},
            None,
            400,
            "bad_time",
        ),
        ({"EventType": "task.created", "TaskSid": TASK}, "application/json", 415, "not_a_form"),
    ],
)
def test_a_malformed_callback_is_a_clear_error_and_the_connection_keeps_serving(
    params: dict[str, str], content_type: str | None, status: int, error: str
) -> None:
    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        await router.play("task.created")
        headers = {
            "Content-Type": content_type or "application/x-www-form-urlencoded",
            "X-Twilio-Signature": sign(router.url, params),
        }
        async with router.session.post(
            router.url, data=urlencode(params), headers=headers
        ) as response:
            bad = response.status, await response.json()
        await router.play("reservation.created")  # same keep-alive connection
        return bad, await desk.settled(hub, 1)

    (got, answer), pops = run(scenario(TABLE, [("telephone", "13579")], body))
    assert (got, answer["error"]) == (status, error)
    assert [p["resource"] for p in pops] == ["13579"]


@pytest.mark.parametrize(
    ("age", "message"),
    [
        ("abc", "TaskAge: expected whole seconds, got 'abc'"),
        ("-5", "TaskAge: expected whole seconds, got '-5'"),
        ("1e12", "TaskAge: expected whole seconds, got '1e12'"),
        ("99999999999", "TaskAge 99999999999 s before 2024-05-14T09:00:00.000Z is out of range"),
    ],
)
def test_a_task_age_that_is_not_whole_seconds_in_range_is_400_bad_time(
    age: str, message: str
) -> None:
    """It was ignored (abc, -5, 1e12) or crashed the request with a 500 (99999999999)."""

    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        return await router.post(event("task.created", TaskAge=age, Timestamp="1715677200"))

    status, answer = run(scenario(TABLE, [], body))
    assert (status, answer) == (400, {"error": "bad_time", "message": message})


def test_a_task_age_back_to_1970_is_still_in_range() -> None:
    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        return await router.post(
            event("task.created", TaskAge="1715677200", Timestamp="1715677200")
        )

    assert run(scenario(TABLE, [], body)) == (204, None)


# --- configuration --------------------------------------------------------------------------------


def write(tmp_path: Path, lines: str) -> Path:
    path = tmp_path / "spop.toml"
    path.write_text(lines, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('auth_token = "x"\nmedia = { chat = "fax" }', "sources.tw.media.chat"),
        ('auth_token = "x"\nresource_fallback = "guess"', "sources.tw.resource_fallback"),
        ('auth_token = "x"\npublic_url = "spop.example.com"', "sources.tw.public_url"),
        ('auth_token = "x"\ncolour = "blue"', "sources.tw.colour"),
        ('auth_token_env = "SPOP_TEST_NOT_SET_ANYWHERE"', "sources.tw.auth_token"),
    ],
)
def test_config_check_names_the_key_at_fault(tmp_path: Path, table: str, key: str) -> None:
    config = write(tmp_path, f'[sources.tw]\ntype = "twilio"\n{table}\n')
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(config)])
    assert result.exit_code == 12, result.output
    assert result.output.startswith(key), result.output


def test_serve_refuses_a_twilio_source_without_a_token(tmp_path: Path) -> None:
    config = write(
        tmp_path, '[sources.tw]\ntype = "twilio"\nauth_token_env = "SPOP_TEST_NOT_SET_ANYWHERE"\n'
    )
    done = subprocess.run(
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
    assert done.returncode == 12
    assert "sources.tw.auth_token: no auth token" in done.stdout + done.stderr


def test_the_same_call_under_uvloop() -> None:
    """`spop serve` runs uvloop: the whole call once more on it."""
    uvloop = pytest.importorskip("uvloop")

    async def body(hub: Any, desk: Desk, router: TaskRouter) -> Any:
        await router.play(
            "task.created", "task-queue.entered", "reservation.created", "reservation.accepted"
        )
        await router.play("reservation.created", "task.completed")  # a retry, then the end
        return await desk.settled(hub, 1), hub.status()

    pops, status = uvloop.run(scenario(TABLE, [("telephone", "13579")], body))
    assert [(p["resource"], p["wait_time"], p["queue_name"]) for p in pops] == [
        ("13579", 10, "Ventes")
    ]
    assert (status["counters"]["duplicate_events"], status["contacts"]) == (1, 1)


def test_standalone_twilio_answers_503_before_taskrouter_gives_up(monkeypatch) -> None:
    """TaskRouter waits 15 s for an answer; the standalone sink retries an unreachable hub for
    60 s, so the source answered after 56 s, a 503 nobody read (an outside check)."""
    import logging
    import socket
    import time

    from spop_cli.sources import RemoteSink, twilio
    from spop_cli.sources.http_common import deliver

    assert twilio.ANSWER_WITHIN < 15
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed

    async def body() -> tuple[int, dict[str, Any], float]:
        sink = RemoteSink(f"{port}@127.0.0.1", retry_for=60.0, timeout=1.0)
        started = time.monotonic()
        status, answer = await deliver(
            sink, [{"contact_id": "c", "event": "queued"}], logging.getLogger("t"), "tw",
            answer_within=0.5,
        )  # fmt: skip
        await sink.close()
        return status, answer, time.monotonic() - started

    status, answer, took = run(body())
    assert (status, answer) == (
        503,
        {"error": "hub_unavailable", "message": "the hub did not answer within 0.5 s"},
    )
    assert took < 5  # not the sink's 60 s
