"""A returning listener with a big backlog (issue 10, section 1): frames within the announced
max_frame both ways, a window of unacknowledged pops per connection, handled ids remembered for
pop_ttl (not a count), `--count` of distinct pops. The benchmark-sized runs are in
tests/test_backlog_chaos.py (`-m chaos`)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from hubproc import (
    Counting,
    HubProcess,
    RawClient,
    ScriptedHub,
    address_of,
    http_of,
    http_post,
    inprocess_hub,
    loops,
    on,
    pop,
    run,
    until,
    wire_pop,
)
from spop_cli import client
from spop_cli.listener.handled import BUCKET, HandledIds
from spop_cli.model import Error, ListenerStatus, ScreenPopError
from spop_cli.pops import normalize_pop
from spop_cli.protocol import ACK_HEAD, ACK_TAIL, ack_frames, pop_frame

S = ListenerStatus


# -- ack frames within the hub's max_frame -----------------------------------------------------


def test_ack_frames_are_split_exactly_at_max_frame() -> None:
    ids = [f"{i:04d}" for i in range(10)]  # each `"0001"` is 6 bytes, 7 with its comma
    whole = len(ACK_HEAD) + len(ACK_TAIL) - 1 + 10 * 6 + 9  # newline excluded
    assert ack_frames(ids, whole) == [ACK_HEAD + b",".join(orjson.dumps(i) for i in ids) + ACK_TAIL]
    just_under = ack_frames(ids, whole - 1)
    assert [orjson.loads(f)["ids"] for f in just_under] == [ids[:9], ids[9:]]
    assert max(len(f) - 1 for f in just_under) == whole - 1 - 6  # nine ids, their 8 commas
    assert ack_frames([], 100) == []


@pytest.mark.parametrize("runner", loops())
def test_a_burst_of_pops_is_acked_in_frames_the_hub_accepts(runner: Callable[..., Any]) -> None:
    """2,000 pops handed over in a few reads: their acks once went out as one frame over the
    hub's max_frame, the hub closed the connection, none counted, and the replay began again."""

    async def body() -> None:
        async with inprocess_hub(max_frame=4096) as hub:
            listener = await Counting().up(address_of(hub), "13579")
            losses: list[S] = []
            listener.listener.on_status_changed(lambda old, new: losses.append(new))
            await hub.publish([pop(source=str(i)) for i in range(2000)])
            assert await until(lambda: hub.delivery.acked == 2000, 30), hub.status()
            counters = hub.status()["counters"]
            assert counters.get("frame_errors", 0) == 0
            assert counters["pending"] == 0
            assert S.Status_Reconnecting not in losses
            assert len(listener.calls) == 2000 and listener.twice() == []
            await listener.listener.shutdown()

    on(runner, body())


@pytest.mark.parametrize("runner", loops())
def test_listener_never_sends_a_frame_over_the_announced_max_frame(
    runner: Callable[..., Any],
) -> None:
    async def body() -> None:
        hub = await ScriptedHub(max_frame=1000).start()
        listener = await Counting().up(hub.address, "13579")
        await hub.send_pops([wire_pop(f"pop-{i:05d}") for i in range(3000)])
        assert await until(lambda: len(hub.acked()) == 3000, 30)
        assert sorted(hub.acked()) == [f"pop-{i:05d}" for i in range(3000)]
        assert max(len(line) for line in hub.lines) <= 1000
        await listener.listener.shutdown()
        hub.close()

    on(runner, body())


def test_a_request_over_the_hubs_max_frame_is_refused_before_it_is_sent() -> None:
    async def body() -> None:
        hub = await ScriptedHub(max_frame=1000).start()
        link = await client.connect(hub.address, role="source")
        sent = len(hub.lines)
        with pytest.raises(ScreenPopError) as caught:
            await link.request("publish", pops=[pop(source="x" * 1000)])
        assert caught.value.code is Error.SCREENPOP_Framework_Error
        frame = orjson.dumps({"op": "publish", "ref": 2, "pops": [pop(source="x" * 1000)]})
        assert caught.value.message == (  # one pop: fewer at once would not help
            f"'publish' frame of {len(frame)} bytes is over the hub's max_frame of 1000 bytes"
            " (make it smaller: its contact_data, say)"
        )
        with pytest.raises(ScreenPopError) as caught:
            await link.request("publish", pops=[pop(source="x" * 500)] * 2)
        frame = orjson.dumps({"op": "publish", "ref": 3, "pops": [pop(source="x" * 500)] * 2})
        assert caught.value.message == (
            f"'publish' frame of {len(frame)} bytes is over the hub's max_frame of 1000 bytes"
            " (send fewer pops at once)"
        )
        assert not link.lost and len(hub.lines) == sent  # nothing sent, the connection kept
        link.close()
        hub.close()

    run(body())


# -- handled ids: for pop_ttl, not a count ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_handled_ids_are_kept_for_their_time_whatever_their_number() -> None:
    clock = Clock()
    handled = HandledIds(keep=120, clock=clock)
    for i in range(10_000):
        handled.add(f"a{i}")
    clock.now += 119
    handled.add("later")
    assert "a0" in handled and "a9999" in handled and len(handled) == 10_001
    clock.now += 1 + BUCKET  # 120 s (and the bucket's second) after the first ten thousand
    handled.add("latest")
    assert "a0" not in handled and "a9999" not in handled
    assert "later" in handled and "latest" in handled and len(handled) == 2


def test_a_repeat_does_not_extend_an_ids_time() -> None:
    clock = Clock()
    handled = HandledIds(keep=10, clock=clock)
    handled.add("x")
    clock.now += 9
    handled.add("x")  # a replay: it must not start the id's ten seconds again
    clock.now += 1 + BUCKET
    handled.add("y")
    assert "x" not in handled and "y" in handled


def test_past_the_cap_the_oldest_go_first_and_are_counted() -> None:
    clock = Clock()
    handled = HandledIds(keep=120, limit=3, clock=clock)
    for name in "abcd":
        handled.add(name)
        clock.now += 0.1
    assert ("a" in handled, "b" in handled, "d" in handled) == (False, True, True)
    assert (len(handled), handled.overflowed) == (3, 1)


@pytest.mark.parametrize("runner", loops())
def test_a_replay_of_5000_handled_pops_runs_no_callback_twice(runner: Callable[..., Any]) -> None:
    """The hub replays what it holds as pending; acks lost with a connection leave everything
    pending. The listener used to remember the last 4,096 ids: the 904 oldest ran again."""

    async def body() -> None:
        hub = await ScriptedHub().start()
        listener = await Counting().up(hub.address, "13579")
        pops = [wire_pop(f"pop-{i:05d}") for i in range(5000)]
        await hub.send_pops(pops)
        await hub.send_pops(pops)  # the same 5,000 again
        await hub.send_pops([wire_pop("last")])
        assert await until(lambda: "last" in listener.calls, 30)
        assert len(listener.calls) == 5001 and listener.twice() == []
        assert await until(lambda: len(hub.acked()) == 10_001, 10)  # repeats are acked again
        await listener.listener.shutdown()
        hub.close()

    on(runner, body())


def test_the_listener_keeps_ids_for_the_pop_ttl_the_hub_announces() -> None:
    async def body() -> None:
        hub = await ScriptedHub(pop_ttl=3600).start()
        listener = await Counting().up(hub.address, "13579")
        assert listener.listener._handled.keep == 3600 + 60  # the hub's pop_ttl and a minute
        await listener.listener.shutdown()
        hub.close()

    run(body())


def test_count_means_distinct_pops(tmp_path: Path) -> None:
    """`spop listen --count 4205` against a hub that replays ten old pops among new ones: it
    exits after 4,205 distinct pops, each printed once (it once counted the repeats)."""

    async def body() -> None:
        hub = await ScriptedHub().start()
        env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag")}
        env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
        env.pop("SPOP_CONFIG", None)
        out = open(tmp_path / "out.jsonl", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "spop_cli", "listen", "telephone", "13579"]
            + ["--server", hub.address, "--json", "--count", "4205", "--timeout", "60"],
            stdout=out,
            stderr=subprocess.PIPE,
            env=env,
        )
        out.close()
        try:
            await asyncio.wait_for(hub.registered.wait(), 30)
            pops = [wire_pop(f"pop-{i:05d}") for i in range(4200)]
            await hub.send_pops(pops)
            await hub.send_pops(pops[:10])  # a replay of the first ten
            await hub.send_pops([wire_pop(f"new-{i}") for i in range(5)])
            code = await asyncio.to_thread(process.wait, 60)
        finally:
            if process.poll() is None:
                process.kill()
            hub.close()
        assert code == 0, process.stderr.read() if process.stderr else ""
        ids = [
            orjson.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_bytes().splitlines()
        ]
        assert len(ids) == 4205 and len(set(ids)) == 4205
        assert {f"new-{i}" for i in range(5)} <= set(ids)

    run(body(), timeout=90)


def test_once_and_count_over_a_backlog_handle_exactly_that_many_and_leave_the_rest(
    tmp_path: Path,
) -> None:
    """A window of 1,000 pops arrives at once: `--once` handled all it had read (2,000–2,900
    of a 3,000 backlog), and acked them after its `unregister` (refused), so the next run
    printed them again. Now the pops past N are not handled nor acked; the hub keeps them."""
    hub = HubProcess(tmp_path / "hub").start()
    env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    env.pop("SPOP_CONFIG", None)
    try:
        ids = []
        for start in range(0, 3000, 500):
            batch = [pop("13579", id=f"b{i:04d}") for i in range(start, start + 500)]
            code, answer = http_post(f"{hub.http}/v1/pops", batch)
            assert code == 200, answer
            ids += answer["ids"]
        printed = []
        for stop in (["--once"], ["--count", "3"]):
            done = subprocess.run(
                [sys.executable, "-m", "spop_cli", "listen", "telephone", "13579", "--json"]
                + ["--server", hub.address, *stop, "--timeout", "30"],
                capture_output=True,
                env=env,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            printed.append([orjson.loads(line)["id"] for line in done.stdout.splitlines()])
        assert printed == [ids[:1], ids[1:4]]  # oldest first, none twice
        with urllib.request.urlopen(f"{hub.http}/v1/status", timeout=10) as answer:
            status = orjson.loads(answer.read())
        assert status["pending"] == 2996
        assert status["counters"]["acked"] == 4
        assert status["counters"].get("unknown_acks", 0) == 0  # listed once not 0
    finally:
        hub.kill()


# -- the window of unacknowledged pops ----------------------------------------------------------


async def after(raw: RawClient, *frames: dict[str, Any]) -> list[str]:
    """Send the frames, then a `status` request: the ids of the pops that arrive before its
    answer. The hub writes in order, so these are all it sent in answer to the frames."""
    for frame in frames:
        await raw.send(frame)
    ref = f"status-{id(frames)}"
    await raw.send({"op": "status", "ref": ref})
    ids = []
    while True:
        got = await raw.frame()
        assert got is not None, "the hub closed the connection"
        if got.get("ref") == ref:
            return ids
        if got["op"] == "pop":
            ids.append(got["pop"]["id"])


def register(resource: str = "13579") -> dict[str, Any]:
    return {"op": "register", "media": "telephone", "resource": resource}


def ack(ids: list[str]) -> dict[str, Any]:
    return {"op": "ack", "ids": ids}


async def registered_raw(hub: Any, resource: str = "13579") -> tuple[RawClient, list[str]]:
    """A raw listener registered for `resource`, and the pops it got at once."""
    raw = await RawClient.open(hub.port)
    await raw.hello()
    return raw, await after(raw, register(resource))


def conn_of(hub: Any, raw: RawClient) -> Any:
    port = raw.writer.get_extra_info("sockname")[1]
    return next(c for c in hub.connections if c.peer == f"127.0.0.1:{port}")


def test_replay_sends_a_window_at_a_time_the_next_as_acks_come_back() -> None:
    async def body() -> None:
        async with inprocess_hub(max_inflight=20) as hub:
            ids = await hub.publish([pop(source=str(i)) for i in range(50)])
            raw, first = await registered_raw(hub)
            assert first == ids[:20]  # a window, oldest first, and nothing more
            more = await after(raw, ack(first[:5]))
            assert more == ids[20:25]  # five acks, five slots
            assert await after(raw) == []
            more = await after(raw, ack(first[5:] + more))
            assert more == ids[25:45]
            more = await after(raw, ack(more))
            assert more == ids[45:]
            assert await after(raw, ack(more)) == []
            assert hub.status()["pending"] == 0 and hub.delivery.delivered == 50
            raw.close()

    run(body())


def test_a_listener_that_never_acks_gets_the_default_window_and_no_more() -> None:
    """The documented default: 1,000 pops in flight per connection."""

    async def body() -> None:
        async with inprocess_hub() as hub:
            ids = await hub.publish([pop(source=str(i)) for i in range(1500)])
            raw, got = await registered_raw(hub)
            while len(got) < 1000:  # the replay is paced by the transport too: read on
                got += await after(raw)
            assert got == ids[:1000]
            assert await after(raw) == []
            raw.close()

    run(body())


def test_live_pops_respect_the_window_too() -> None:
    async def body() -> None:
        async with inprocess_hub(max_inflight=20) as hub:
            raw, first = await registered_raw(hub)
            assert first == []
            ids = await hub.publish([pop(source=str(i)) for i in range(30)])
            assert await after(raw) == ids[:20]
            assert await after(raw, ack(ids[:3])) == ids[20:23]
            raw.close()

    run(body())


def test_live_pops_go_before_the_rest_of_a_replay() -> None:
    async def body() -> None:
        async with inprocess_hub(max_inflight=5) as hub:
            old = await hub.publish([pop(source=str(i)) for i in range(10)])
            raw, first = await registered_raw(hub)
            assert first == old[:5]
            new = await hub.publish([pop(source="ringing now")])
            assert await after(raw, ack(old[:2])) == new + old[5:6]
            raw.close()

    run(body())


def test_a_slot_frees_when_its_pop_is_settled_elsewhere() -> None:
    """Acked by a twin listener of the same key, expired, or withdrawn with its contact: the pop
    is no longer owed, so the window moves on without this connection's ack."""

    async def body() -> None:
        async with inprocess_hub(max_inflight=4, pop_ttl=60) as hub:
            ids = await hub.publish([pop(source=str(i)) for i in range(6)])
            ids += await hub.publish([pop(source=str(i), contact_id="c1") for i in range(6, 8)])
            one, first = await registered_raw(hub)
            twin, twins = await registered_raw(hub)
            assert first == twins == ids[:4]
            assert await after(twin, ack(ids[:2])) == ids[4:6]
            assert await after(one) == ids[4:6]  # the twin's acks freed two slots here too
            for pop_id in ids[2:4]:
                hub.delivery.expire_at(pop_id, 0)
            hub._sweep()
            assert hub.delivery.expired == 2
            assert await after(one) == ids[6:8]
            assert list(conn_of(hub, one).inflight) == ids[4:8]
            hub.delivery.withdraw("c1")
            assert list(conn_of(hub, one).inflight) == ids[4:6]
            one.close()
            twin.close()

    run(body())


def test_unregistering_frees_the_slots_of_that_key() -> None:
    async def body() -> None:
        async with inprocess_hub(max_inflight=3) as hub:
            a = await hub.publish([pop("a", source=str(i)) for i in range(3)])
            b = await hub.publish([pop("b", source=str(i)) for i in range(3)])
            raw, first = await registered_raw(hub, "a")
            assert first == a
            assert await after(raw, register("b")) == []  # the window is full
            unregister = {"op": "unregister", "media": "telephone", "resource": "a"}
            assert await after(raw, unregister) == b
            raw.close()

    run(body())


# -- no pop frame over the max_frame the hub announces ------------------------------------------

LIMIT = 4096


def sized_pop(frame_bytes: int, **fields: Any) -> dict[str, Any]:
    """A pop (as a source sends it) whose `pop` frame is exactly `frame_bytes` long, newline
    excluded: its id and time are given, so the hub adds nothing of unknown length."""
    base = pop(id="sized", created_at="2026-01-01T00:00:00.000Z", contact_data={"k": ""}, **fields)
    empty = len(pop_frame(normalize_pop(base))) - 1
    base["contact_data"] = {"k": "x" * (frame_bytes - empty)}
    assert len(pop_frame(normalize_pop(base))) - 1 == frame_bytes
    return base


def test_a_pop_exactly_at_max_frame_is_accepted_and_delivered() -> None:
    async def body() -> None:
        async with inprocess_hub(max_frame=LIMIT) as hub:
            listener = await Counting().up(address_of(hub), "13579")
            status, answer = await asyncio.to_thread(
                http_post, f"{http_of(hub)}/v1/pops", sized_pop(LIMIT)
            )
            assert (status, answer["ids"]) == (200, ["sized"])
            assert await until(lambda: "sized" in listener.calls)
            await listener.listener.shutdown()

    run(body())


def test_a_pop_one_byte_over_max_frame_is_refused_over_http() -> None:
    async def body() -> None:
        async with inprocess_hub(max_frame=LIMIT) as hub:
            body = [pop(source="fine"), sized_pop(LIMIT + 1)]
            status, answer = await asyncio.to_thread(http_post, f"{http_of(hub)}/v1/pops", body)
            assert status == 413
            assert answer == {
                "error": "pop_too_large",
                "message": f"pop 1: the pop would be a frame of {LIMIT + 1} bytes, over the hub's"
                f" max_frame of {LIMIT} bytes: send less contact_data",
                "field": "contact_data",
                "index": 1,
            }
            assert hub.status()["pending"] == 0  # none of the array was accepted

    run(body())


def test_a_pop_one_byte_over_max_frame_is_refused_in_a_publish_frame() -> None:
    async def body() -> None:
        async with inprocess_hub(max_frame=LIMIT) as hub:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            answer = await raw.request("publish", pops=sized_pop(LIMIT + 1))
            assert answer["op"] == "error" and "fatal" not in answer
            assert answer["detail"] == {
                "error": "pop_too_large",
                "message": f"the pop would be a frame of {LIMIT + 1} bytes, over the hub's"
                f" max_frame of {LIMIT} bytes: send less contact_data",
                "field": "contact_data",
            }
            ok = await raw.request("publish", pops=sized_pop(LIMIT))  # the connection stays
            assert (ok["op"], ok["ids"]) == ("ok", ["sized"])
            raw.close()

    run(body())


def test_a_contact_event_whose_pop_is_over_max_frame_is_refused_and_changes_nothing() -> None:
    async def body() -> None:
        async with inprocess_hub(max_frame=LIMIT) as hub:
            listener = await Counting().up(address_of(hub), "13579")
            url = f"{http_of(hub)}/v1/contacts"
            queued = {"contact_id": "c", "event": "queued", "contact_data": {"a": "1"}}
            assert (await asyncio.to_thread(http_post, url, queued))[0] == 200
            big = {"contact_id": "c", "event": "routed", "resource": "13579"}
            big["contact_data"] = {"b": "x" * LIMIT}
            status, answer = await asyncio.to_thread(http_post, url, big)
            assert status == 413
            assert answer["error"] == "pop_too_large" and answer["field"] == "contact_data"
            assert re.fullmatch(
                rf"the pop would be a frame of \d+ bytes, over the hub's max_frame of {LIMIT}"
                " bytes: send less contact_data",
                answer["message"],
            )
            routed = {"contact_id": "c", "event": "routed", "resource": "13579"}
            assert (await asyncio.to_thread(http_post, url, routed))[0] == 200
            assert await until(lambda: len(listener.calls) == 1)
            assert listener.listener.last_pop is not None
            assert dict(listener.listener.last_pop.contact_data.to_dict()) == {"a": "1"}
            await listener.listener.shutdown()

    run(body())


def test_the_welcome_announces_max_frame_and_pop_ttl() -> None:
    async def body() -> None:
        async with inprocess_hub(max_frame=LIMIT, pop_ttl=45) as hub:
            raw = await RawClient.open(hub.port)
            welcome = await raw.hello()
            assert (welcome["max_frame"], welcome["pop_ttl"]) == (LIMIT, 45)
            raw.close()

    run(body())
