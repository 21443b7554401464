"""`open_contacts`: a source's contacts not ended, as the hub keeps them (docs/protocol.md), so
that a source restarted (its own process, or `spop serve` with it inside) pops nobody twice."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from hubproc import RawClient, address_of, inprocess_hub, run
from natsproc import NatsCluster
from spop_cli import client
from spop_cli.model import ScreenPopError
from spop_cli.protocol import MAX_ORIGIN
from test_cluster import nats_hub

T = "2026-12-03T10:00:0{}+00:00"

PBX = [  # c-1 is answered and goes on; c-2 ends
    {"id": "e1", "contact_id": "c-1", "event": "queued", "media": "telephone",
     "queue_name": "Ventes", "source": "0612", "at": T.format(0)},
    {"id": "e2", "contact_id": "c-1", "event": "routed", "resource": "13579", "at": T.format(5)},
    {"id": "e3", "contact_id": "c-1", "event": "answered", "resource": "13579",
     "at": T.format(8)},
    {"id": "e4", "contact_id": "c-2", "event": "routed", "media": "email", "resource": "2222",
     "at": T.format(1)},
    {"id": "e5", "contact_id": "c-2", "event": "ended", "at": T.format(2)},
]  # fmt: skip
C1 = {
    "contact_id": "c-1",
    "media": "telephone",
    "last_at": T.format(8),
    "segment_start": T.format(0),
    "answered_at": T.format(8),
    "holder": "13579",
    "following": ["13579"],
}
C3 = {
    "contact_id": "c-3",
    "media": "callback",
    "last_at": T.format(1),
    "segment_start": None,
    "answered_at": None,
    "holder": "3",
    "following": ["3"],
}


async def send_all(address: str) -> None:
    """pbx's contacts, one of crm's, one sent without an origin."""
    await client.send_contacts(address, PBX, origin="pbx")
    c3 = {"id": "e6", "contact_id": "c-3", "event": "routed", "media": "callback"}
    await client.send_contacts(address, [{**c3, "resource": "3", "at": T.format(1)}], origin="crm")
    c4 = {"id": "e7", "contact_id": "c-4", "event": "routed", "media": "telephone"}
    await client.send_contacts(address, [{**c4, "resource": "4", "at": T.format(1)}])


async def open_of(address: str) -> dict[str, list[dict[str, Any]]]:
    return {o: await client.open_contacts(address, o) for o in ("pbx", "crm", "other")}


def test_a_sources_open_contacts_and_only_its_own(tmp_path: Path) -> None:
    journal = tmp_path / "journal"

    async def main() -> None:
        async with inprocess_hub(journal=str(journal)) as hub:
            await send_all(address_of(hub))
            assert await open_of(address_of(hub)) == {"pbx": [C1], "crm": [C3], "other": []}
        async with inprocess_hub(journal=str(journal)) as hub:  # the origin is journalled
            assert await open_of(address_of(hub)) == {"pbx": [C1], "crm": [C3], "other": []}
            await client.send_contacts(address_of(hub), [{"contact_id": "c-1", "event": "ended"}])
            assert await client.open_contacts(address_of(hub), "pbx") == []

    run(main())


def test_a_clustered_hub_reads_them_from_the_bucket(tmp_path: Path) -> None:
    """Sent through one hub, read on another: the states are in the KV bucket."""
    cluster = NatsCluster(tmp_path, 1)
    a, b = nats_hub(cluster), nats_hub(cluster)
    try:
        asyncio.run(send_all(a.address))
        assert asyncio.run(open_of(b.address)) == {"pbx": [C1], "crm": [C3], "other": []}
    finally:
        a.close()
        b.close()
        cluster.close()


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"op": "open_contacts"}, "open_contacts needs 'origin'"),
        ({"op": "open_contacts", "origin": ""}, "open_contacts needs 'origin'"),
        ({"op": "open_contacts", "origin": "p" * (MAX_ORIGIN + 1)}, "open_contacts needs"),
        ({"op": "open_contacts", "origin": 7}, "open_contacts needs 'origin'"),
        ({"op": "open_contacts", "origin": "a\nb"}, "open_contacts needs 'origin'"),
        ({"op": "open_contacts", "origin": "a\x9bb"}, "open_contacts needs 'origin'"),
        ({"op": "contact", "events": [], "origin": ["pbx"]}, "contact needs 'origin'"),
        ({"op": "contact", "events": [], "origin": "p" * (MAX_ORIGIN + 1)}, "contact needs"),
    ],
)
def test_a_bad_origin_is_a_protocol_error(frame: dict[str, Any], message: str) -> None:
    async def main() -> list[dict[str, Any]]:
        async with inprocess_hub() as hub:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            await raw.send({**frame, "ref": 1})
            return await raw.frames_until_closed()

    (error,) = run(main())
    assert error["code"] == "SCREENPOP_Framework_Error"
    assert error["fatal"] is True
    assert error["message"].startswith(message)
    assert error["message"].endswith(f"the source's name, 1 to {MAX_ORIGIN} characters")


def test_the_longest_origin_is_taken() -> None:
    async def main() -> list[dict[str, Any]]:
        async with inprocess_hub() as hub:
            origin = "p" * MAX_ORIGIN
            event = {"contact_id": "c", "event": "routed", "media": "email", "resource": "5"}
            await client.send_contacts(address_of(hub), [event], origin=origin)
            return await client.open_contacts(address_of(hub), origin)

    assert [c["contact_id"] for c in run(main())] == ["c"]


def test_a_null_origin_on_contact_is_no_origin() -> None:
    async def main() -> dict[str, Any]:
        async with inprocess_hub() as hub:
            raw = await RawClient.open(hub.port)
            await raw.hello()
            event = {"contact_id": "c", "event": "routed", "media": "email", "resource": "5"}
            return await raw.request("contact", events=[event], origin=None)

    answer = run(main())
    assert (answer["op"], answer["applied"]) == ("ok", 1)


def test_a_listener_token_may_not_read_them_and_the_connection_goes_on() -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with inprocess_hub(token="desk", source_token="pbx-secret") as hub:
            raw = await RawClient.open(hub.port)
            await raw.hello(token="desk")
            refused = await raw.request("open_contacts", origin="pbx")
            status = await raw.request("status")
            with pytest.raises(ScreenPopError, match="this token may not read a source's"):
                await client.open_contacts(address_of(hub), "pbx", token="desk")
            assert await client.open_contacts(address_of(hub), "pbx", token="pbx-secret") == []
            return refused, status

    refused, status = run(main())
    assert (refused["op"], refused["code"], refused["message"]) == (
        "error",
        "SCREENPOP_Initialization_Error",
        "this token may not read a source's contacts",
    )
    assert "fatal" not in refused
    assert status["op"] == "ok"
