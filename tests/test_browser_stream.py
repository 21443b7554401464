"""The browser endpoint with a plain HTTP client: sign-in, the SSE stream, acks, resume, refusals."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest

from hubproc import http_of, inprocess_hub, run, until
from spop_cli.hub.browser import Sessions, sse_event
from sse import BrowserClient

TOKEN = "listen-secret"
SOURCE = "source-secret"
CRM = "http://crm.example.test:8000"


def hub_options(**extra: Any) -> dict[str, Any]:
    return {"token": TOKEN, "source_token": SOURCE, "browser_origins": [CRM], **extra}


async def post_pop(base: str, **fields: Any) -> str:
    pop = {"media": "telephone", "resource": "1001", "source": "0612345678", **fields}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}/v1/pops", json=pop, headers={"Authorization": f"Bearer {SOURCE}"}) as r,
    ):
        assert r.status == 200, await r.text()
        return (await r.json())["ids"][0]


async def signed_in(base: str, origin: str | None = None) -> BrowserClient:
    client = BrowserClient(base, origin)
    response = await client.login(TOKEN)
    assert response.status == 200
    return client


def test_sign_in_sets_an_httponly_strict_cookie_and_never_takes_a_query_token() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            client = BrowserClient(http_of(hub))
            try:
                response = await client.login(TOKEN)
                assert response.status == 200
                cookie = response.headers["Set-Cookie"]
                assert cookie.startswith("spop_session=")
                assert "HttpOnly" in cookie
                assert "SameSite=Strict" in cookie
                assert "Secure" not in cookie  # no TLS on this hub
                assert "Max-Age=43200" in cookie
                info = await response.json()
                assert sorted(info) == ["buttons", "csrf", "expires", "heartbeat", "pop_ttl"]
                assert (info["heartbeat"], info["pop_ttl"], info["buttons"]) == (1, 120, [])
            finally:
                await client.close()

    run(body())


def test_wrong_token_is_refused_and_no_cookie_set() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            client = BrowserClient(http_of(hub))
            try:
                response = await client.login("wrong")
                assert response.status == 401
                assert (await response.json())["error"] == "unauthorized"
                assert "Set-Cookie" not in response.headers
                stream = await client.stream("telephone", ["1001"])
                assert stream.response.status == 401
                assert hub.counters["auth_failures"] == 1
            finally:
                await client.close()

    run(body())


def test_sign_in_needs_a_json_body() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub, aiohttp.ClientSession() as http:
            form = {"token": TOKEN}  # what a cross-site <form> could send without a preflight
            async with http.post(f"{http_of(hub)}/v1/browser/session", data=form) as response:
                assert response.status == 415
                assert (await response.json())["error"] == "unsupported_media_type"

    run(body())


def test_a_tampered_or_expired_cookie_is_refused() -> None:
    sessions = Sessions(b"k" * 32, (TOKEN, None), ttl=60)
    cookie, session = sessions.issue("listener")
    assert sessions.check(cookie) == session
    body, _, sig = cookie.partition(".")
    assert sessions.check(body + "." + sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")) is None
    assert Sessions(b"k" * 32, ("new-token", None), ttl=60).check(cookie) is None  # token changed
    assert Sessions(b"x" * 32, (TOKEN, None), ttl=60).check(cookie) is None  # another hub
    expired = Sessions(b"k" * 32, (TOKEN, None), ttl=-1)
    assert expired.check(expired.issue("listener")[0]) is None


def test_a_pop_becomes_an_sse_event_and_stays_pending_until_acked() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            base = http_of(hub)
            client = await signed_in(base)
            try:
                stream = await client.stream("telephone", ["1001"])
                assert stream.response.status == 200
                assert stream.response.headers["Content-Type"] == "text/event-stream"
                ready = await stream.next(("ready",))
                assert ready.json()["keys"] == [["telephone", "1001"]]
                pop_id = await post_pop(base, queue_name="Sales")
                event = await stream.next()
                assert (event.event, event.id) == ("pop", pop_id)
                pop = event.json()
                assert (pop["source"], pop["queue_name"], pop["resource"]) == (
                    "0612345678",
                    "Sales",
                    "1001",
                )
                assert pop_id in hub.delivery.pending
                answer = await client.ack("telephone", ["1001"], [pop_id])
                assert (answer.status, await answer.json()) == (200, {"acked": 1})
                assert pop_id not in hub.delivery.pending
                again = await client.ack("telephone", ["1001"], [pop_id])
                assert await again.json() == {"acked": 0}
                await stream.close()
            finally:
                await client.close()

    run(body())


def test_one_stream_carries_several_resources_and_only_theirs() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            base = http_of(hub)
            client = await signed_in(base)
            try:
                stream = await client.stream("telephone", ["1001", "1002"])
                await stream.next(("ready",))
                a = await post_pop(base, resource="1001")
                await post_pop(base, resource="1003")
                b = await post_pop(base, resource="1002")
                got = [(await stream.next()).id, (await stream.next()).id]
                assert got == [a, b]
                assert await stream.quiet(0.3) == []
                await stream.close()
            finally:
                await client.close()

    run(body())


def test_a_dropped_stream_gets_its_unacked_pops_again_on_resume(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "spop.hub")

    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            base = http_of(hub)
            client = await signed_in(base)
            try:
                first = await client.stream("telephone", ["1001"])
                await first.next(("ready",))
                a = await post_pop(base)
                assert (await first.next()).id == a
                await first.close()  # dropped before the ack
                assert await until(lambda: not hub.browser_streams)
                b = await post_pop(base)  # while no stream is open
                second = await client.stream("telephone", ["1001"], last_event_id=a)
                ready = await second.next(("ready",))
                assert ready.json()["resumed_after"] == a
                stream_id = ready.json()["stream"]
                logged = [r.getMessage() for r in caplog.records if stream_id in r.getMessage()]
                assert len(logged) == 1
                assert logged[0].endswith(f"for [('telephone', '1001')], resumed after {a!r}")
                assert [(await second.next()).id, (await second.next()).id] == [a, b]
                await client.ack("telephone", ["1001"], [a])
                await second.close()
                assert await until(lambda: not hub.browser_streams)
                third = await client.stream("telephone", ["1001"], last_event_id=b)
                assert (await third.next()).id == b  # only b: a was acked
                assert await third.quiet(0.3) == []
                await third.close()
            finally:
                await client.close()

    run(body())


def test_the_window_holds_pops_beyond_max_inflight_until_acks_free_it() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options(max_inflight=2)) as hub:
            base = http_of(hub)
            client = await signed_in(base)
            try:
                stream = await client.stream("telephone", ["1001"])
                await stream.next(("ready",))
                ids = [await post_pop(base) for _ in range(3)]
                assert [(await stream.next()).id for _ in range(2)] == ids[:2]
                assert await stream.quiet(0.3) == []  # the third waits for a slot
                await client.ack("telephone", ["1001"], [ids[0]])
                assert (await stream.next()).id == ids[2]
                await stream.close()
            finally:
                await client.close()

    run(body())


def test_heartbeats_flow_on_an_idle_stream() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options(heartbeat=0.2)) as hub:
            client = await signed_in(http_of(hub))
            try:
                stream = await client.stream("telephone", ["1001"])
                await stream.next(("ready",))
                pings = [await stream.next(("ping",), timeout=5) for _ in range(2)]
                assert all(int(p.data) > 0 for p in pings)
                await stream.close()
            finally:
                await client.close()

    run(body())


def test_ack_without_the_csrf_header_is_refused() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            base = http_of(hub)
            client = await signed_in(base)
            try:
                stream = await client.stream("telephone", ["1001"])
                await stream.next(("ready",))
                pop_id = await post_pop(base)
                await stream.next()
                for csrf in ("", "forged"):
                    answer = await client.ack("telephone", ["1001"], [pop_id], csrf=csrf)
                    assert answer.status == 403
                    assert (await answer.json())["error"] == "csrf"
                assert pop_id in hub.delivery.pending
                assert hub.counters["browser_refused"] == 2
                await stream.close()
            finally:
                await client.close()

    run(body())


def test_an_ack_takes_10000_ids_not_10001() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            client = await signed_in(http_of(hub))
            digits = "0123456789abcdefghijklmnopqrstuvwxyz"
            # ids of 1-3 characters in compact JSON: 10,001 of them fit the 64 KiB body limit
            ids = [
                "".join(digits[n // 36**p % 36] for p in (2, 1, 0)).lstrip("0") or "0"
                for n in range(10_001)
            ]
            assert len(set(ids)) == 10_001

            async def ack(ids: list[str]) -> tuple[int, Any]:
                body = {"media": "telephone", "resource": ["1001"], "ids": ids}
                async with client.session.post(
                    f"{client.base}/v1/browser/ack",
                    data=json.dumps(body, separators=(",", ":")),
                    headers={
                        **client.headers(),
                        "X-Spop-CSRF": client.csrf,
                        "Content-Type": "application/json",
                    },
                ) as answer:
                    return answer.status, await answer.json()

            try:
                assert await ack(ids[:10_000]) == (200, {"acked": 0})
                assert await ack(ids) == (
                    400,
                    {"error": "invalid_ack", "message": "at most 10,000 ids per request"},
                )
            finally:
                await client.close()

    run(body())


def test_ack_without_a_session_is_refused() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            client = BrowserClient(http_of(hub))
            try:
                answer = await client.ack("telephone", ["1001"], ["x"], csrf="anything")
                assert answer.status == 401
            finally:
                await client.close()

    run(body())


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        (CRM, 200),  # configured
        ("http://evil.example.test:8000", 403),  # not configured
        ("http://crm.example.test:8001", 403),  # same host, another port: another origin
    ],
)
def test_other_origins_are_kept_out(origin: str, status: int) -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            base = http_of(hub)
            own = await signed_in(base)  # the cookie, as if set by the panel
            try:
                own.origin = origin
                stream = await own.stream("telephone", ["1001"])
                assert stream.response.status == status
                if status == 200:
                    headers = stream.response.headers
                    assert headers["Access-Control-Allow-Origin"] == origin
                    assert headers["Access-Control-Allow-Credentials"] == "true"
                else:
                    assert (await stream.response.json())["error"] == "cross_origin"
                    assert "Access-Control-Allow-Origin" not in stream.response.headers
                    answer = await own.ack("telephone", ["1001"], ["x"])
                    assert answer.status == 403
                    login = await own.login(TOKEN)
                    assert login.status == 403
                    assert (await login.json())["message"] == (
                        f"origin {origin!r} is not in browser_origins"
                    )
                    assert hub.counters["browser_refused"] == 3  # stream, ack, sign-in
                await stream.close()
            finally:
                await own.close()

    run(body())


def test_preflight_only_for_configured_origins() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub, aiohttp.ClientSession() as http:
            url = f"{http_of(hub)}/v1/browser/ack"
            ask = {"Access-Control-Request-Method": "POST"}
            async with http.options(url, headers={**ask, "Origin": CRM}) as r:
                assert r.status == 204
                assert r.headers["Access-Control-Allow-Origin"] == CRM
                assert "X-Spop-CSRF" in r.headers["Access-Control-Allow-Headers"]
            async with http.options(url, headers={**ask, "Origin": "http://evil.test"}) as r:
                assert r.status == 403
                assert "Access-Control-Allow-Origin" not in r.headers
                assert await r.json() == {
                    "error": "cross_origin",
                    "message": "origin 'http://evil.test' is not in browser_origins",
                }
            assert hub.counters["browser_refused"] == 1  # a refused preflight counts too

    run(body())


def test_own_origin_needs_no_configuration() -> None:
    async def body() -> None:
        async with inprocess_hub(token=TOKEN) as hub:
            base = http_of(hub)
            client = await signed_in(base, origin=base)
            try:
                stream = await client.stream("telephone", ["1001"])
                assert stream.response.status == 200
                await stream.close()
            finally:
                await client.close()

    run(body())


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ([("resource", "1001")], "name a media and at least one resource"),
        ([("media", "telephone")], "name a media and at least one resource"),
        (
            [("media", "fax"), ("resource", "1")],
            "unknown media 'fax' (expected one of telephone, callback, email, webcollab)",
        ),
        (
            [("media", "telephone"), ("resource", "x" * 129)],
            "resource is 129 characters long (at most 128)",
        ),
        ([("media", "telephone"), ("resource", "  ")], "resource is empty"),
        (
            [("media", "telephone"), ("resource", "10\n01")],
            "resource has control characters, invisible or private-use ones (U+000A at 2)",
        ),
    ],
)
def test_a_bad_stream_query_names_the_problem(query: list[tuple[str, str]], message: str) -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            client = await signed_in(http_of(hub))
            try:
                async with client.session.get(
                    f"{http_of(hub)}/v1/browser/stream", params=query
                ) as r:
                    assert r.status == 400
                    assert await r.json() == {"error": "invalid_key", "message": message}
            finally:
                await client.close()

    run(body())


def test_resource_of_128_characters_is_accepted() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            client = await signed_in(http_of(hub))
            try:
                stream = await client.stream("telephone", ["x" * 128])
                assert stream.response.status == 200
                await stream.close()
            finally:
                await client.close()

    run(body())


def test_any_frame_with_an_id_is_forwarded_by_its_op() -> None:
    change = b'{"op":"change","change":{"id":"c1","contact_id":"k","change":"answered"}}\n'
    assert sse_event(change) == (
        b'event: change\nid: c1\ndata: {"id":"c1","contact_id":"k","change":"answered"}\n\n'
    )
    assert (
        sse_event(b'{"op":"pop","pop":{"id":"p1"}}\n')
        == b'event: pop\nid: p1\ndata: {"id":"p1"}\n\n'
    )
    assert sse_event(b'{"op":"ok","ref":1}\n') is None
    assert sse_event(b'{"op":"ping"}\n') is None


def test_a_stream_closes_when_the_hub_stops() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            client = await signed_in(http_of(hub))
            stream = await client.stream("telephone", ["1001"])
            await stream.next(("ready",))
        # the hub stopped without waiting for the browser (aiohttp would wait 60 s)
        async with asyncio.timeout(5):
            assert stream.task is not None
            await stream.task
        await client.close()

    run(body())


def test_signing_out_clears_the_cookie() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            base = http_of(hub)
            client = await signed_in(base)
            try:
                headers = {"X-Spop-CSRF": client.csrf}
                async with client.session.delete(
                    f"{base}/v1/browser/session", headers=headers
                ) as r:
                    assert r.status == 200
                async with client.session.get(f"{base}/v1/browser/session") as r:
                    assert r.status == 401
            finally:
                await client.close()

    run(body())


def test_static_files_are_served() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub, aiohttp.ClientSession() as http:
            for path, kind in [
                ("/spop.js", "text/javascript"),
                ("/panel", "text/html"),
                ("/panel/panel.js", "text/javascript"),
                ("/panel/panel.css", "text/css"),
            ]:
                async with http.get(f"{http_of(hub)}{path}") as r:
                    assert r.status == 200, path
                    assert r.content_type == kind
                    assert len(await r.read()) > 100

    run(body())


def tls_pair(tmp_path: Any) -> tuple[Any, dict[str, str]]:
    """A client context trusting a fresh CA, and the hub options for a certificate it issued."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "hub.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "hub.pem"))
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    return client_ssl, {"tls_cert": str(tmp_path / "hub.pem"), "tls_key": str(tmp_path / "hub.key")}


def test_the_cookie_is_secure_under_tls(tmp_path: Any) -> None:
    client_ssl, tls = tls_pair(tmp_path)

    async def body() -> None:
        async with inprocess_hub(**hub_options(**tls)) as hub:
            connector = aiohttp.TCPConnector(ssl=client_ssl)
            async with aiohttp.ClientSession(connector=connector) as http:
                url = f"{http_of(hub, 'https')}/v1/browser/session"
                async with http.post(url, json={"token": TOKEN}) as r:
                    assert r.status == 200
                    assert "Secure" in r.headers["Set-Cookie"]

    run(body())


def test_status_counts_browser_streams_and_refusals() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            base = http_of(hub)
            client = await signed_in(base)
            try:
                stream = await client.stream("telephone", ["1001", "1002"])
                await stream.next(("ready",))
                status = hub.status()
                assert status["browser_streams"] == 1
                assert status["listeners"] == [
                    {"media": "telephone", "resource": "1001", "connections": 1},
                    {"media": "telephone", "resource": "1002", "connections": 1},
                ]
                await client.ack("telephone", ["1001"], ["x"], csrf="forged")
                assert hub.status()["counters"]["browser_refused"] == 1
                assert hub.status()["counters"]["browser_streams_opened"] == 1
                await stream.close()
                assert await until(lambda: hub.status()["browser_streams"] == 0)
                assert hub.status()["listeners"] == []
            finally:
                await client.close()

    run(body())


def test_resume_on_uvloop_as_spop_serve_runs() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def body() -> None:
        async with inprocess_hub(**hub_options(heartbeat=0.2)) as hub:
            base = http_of(hub)
            client = await signed_in(base)
            try:
                first = await client.stream("telephone", ["1001"])
                await first.next(("ready",))
                a = await post_pop(base)
                assert (await first.next()).id == a
                await first.next(("ping",))  # the idle timer fires on this loop too
                await first.close()
                assert await until(lambda: not hub.browser_streams)
                second = await client.stream("telephone", ["1001"], last_event_id=a)
                assert (await second.next()).id == a
                await client.ack("telephone", ["1001"], [a])
                assert a not in hub.delivery.pending
                await second.close()
            finally:
                await client.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(body(), 60))


def test_every_web_file_is_package_data() -> None:
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["spop_cli"]
    web = sorted(p.name for p in (root / "src" / "spop_cli" / "web").iterdir())
    assert web == ["panel.css", "panel.html", "panel.js", "spop.js"]
    for name in web:
        assert any(fnmatch.fnmatch(f"web/{name}", pattern) for pattern in patterns), name


def test_a_closed_tab_is_unregistered_within_a_second_not_a_heartbeat() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options(heartbeat=30)) as hub:
            client = await signed_in(http_of(hub))
            try:
                stream = await client.stream("telephone", ["1001"])
                await stream.next(("ready",))
                assert hub.status()["browser_streams"] == 1
                await stream.close()
                assert await until(lambda: not hub.browser_streams, timeout=5)
                assert list(hub.delivery.routing.counts()) == []
            finally:
                await client.close()

    run(body())


def test_a_stream_ends_with_its_session() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options(browser_session_ttl=1)) as hub:
            client = await signed_in(http_of(hub))
            try:
                stream = await client.stream("telephone", ["1001"])
                await stream.next(("ready",))
                assert stream.task is not None
                async with asyncio.timeout(5):
                    await stream.task  # the hub closed it when the session ran out
                assert not hub.browser_streams
                again = await client.stream("telephone", ["1001"])
                assert again.response.status == 401
            finally:
                await client.close()

    run(body())


def test_contact_events_reach_the_stream_as_change_events() -> None:
    """Issue 12's change frames, made by the hub from real contact events, flow to a browser."""

    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            base = http_of(hub)
            client = await signed_in(base)
            try:
                stream = await client.stream("telephone", ["1001"])
                await stream.next(("ready",))
                events = [
                    {"contact_id": "b-1", "event": "queued", "media": "telephone",
                     "source": "12345", "queue_name": "Sales"},
                    {"contact_id": "b-1", "event": "routed", "resource": "1001"},
                ]  # fmt: skip
                async with (
                    aiohttp.ClientSession() as http,
                    http.post(f"{base}/v1/contacts", json=events,
                              headers={"Authorization": f"Bearer {SOURCE}"}) as r,
                ):  # fmt: skip
                    assert r.status == 200, await r.text()
                pop = await stream.next()
                assert (pop.event, pop.json()["source"]) == ("pop", "12345")
                await client.ack("telephone", ["1001"], [pop.id])
                for event in ("answered", "ended"):
                    async with (
                        aiohttp.ClientSession() as http,
                        http.post(f"{base}/v1/contacts",
                                  json={"contact_id": "b-1", "event": event, "resource": "1001"}
                                  if event == "answered" else {"contact_id": "b-1", "event": event},
                                  headers={"Authorization": f"Bearer {SOURCE}"}) as r,
                    ):  # fmt: skip
                        assert r.status == 200, await r.text()
                answered = await stream.next()
                assert answered.event == "change"
                assert (answered.json()["change"], answered.json()["answered_by"]) == (
                    "answered",
                    "1001",
                )
                assert answered.json()["pop_id"] == pop.id
                ended = await stream.next()
                assert (ended.event, ended.json()["change"]) == ("change", "ended")
                acked = await client.ack("telephone", ["1001"], [answered.id, ended.id])
                assert await acked.json() == {"acked": 2}
                await stream.close()
            finally:
                await client.close()

    run(body())


async def _session_cookie(base: str) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}/v1/browser/session", json={"token": TOKEN}) as r,
    ):
        assert r.status == 200
        return r.cookies["spop_session"].value


async def _raw_stream(
    base: str, version: str = "1.1", rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A stream opened by hand: the reader, the writer, and the bytes up to the `ready` event."""
    import socket

    cookie = await _session_cookie(base)
    host, _, port = base.removeprefix("http://").partition(":")
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        f"GET /v1/browser/stream?media=telephone&resource=1001 HTTP/{version}\r\n"
        f"Host: {host}\r\nCookie: spop_session={cookie}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"event: ready\n"), 10)
    head += await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
    if b"transfer-encoding: chunked" in head.lower():
        head += await reader.readexactly(2)  # the end of the ready event's chunk
    return reader, writer, head


def test_an_http_1_0_stream_gets_its_events_unchunked() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            base = http_of(hub)
            reader, writer, head = await _raw_stream(base, "1.0")
            assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower()
            pop_id = await post_pop(base)
            event = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
            assert event.startswith(b"event: pop\nid: %s\ndata: {" % pop_id.encode())
            writer.close()

    run(body())


def test_an_event_is_one_chunk_built_once_for_every_stream_of_its_key() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options()) as hub:
            base = http_of(hub)
            first = await _raw_stream(base)
            second = await _raw_stream(base)
            assert b"transfer-encoding: chunked" in first[2].lower()
            pop_id = await post_pop(base, queue_name="Sales")
            event = hub.delivery.pending[pop_id].sse
            assert event is not None and event.startswith(b"event: pop\nid: %s\n" % pop_id.encode())
            for reader, writer, _ in (first, second):
                chunk = b"%x\r\n%s\r\n" % (len(event), event)
                assert await asyncio.wait_for(reader.readexactly(len(chunk)), 10) == chunk
                writer.close()

    run(body())


def test_a_browser_that_stops_reading_is_dropped_and_its_pops_kept() -> None:
    async def body() -> None:
        async with inprocess_hub(**hub_options(max_buffer=64 * 1024)) as hub:
            base = http_of(hub)
            _, writer, _ = await _raw_stream(base, rcvbuf=4096)  # then never read again
            await until(lambda: len(hub.browser_streams) == 1)
            big = {"a": "x" * 4000, "b": "y" * 4000}
            pops = [
                {"media": "telephone", "resource": "1001", "source": "1", "contact_data": big}
                for _ in range(50)
            ]
            headers = {"Authorization": f"Bearer {SOURCE}"}
            posted = 0
            async with aiohttp.ClientSession() as http:
                while posted < 1000 and not hub.counters["slow_consumers_dropped"]:
                    async with http.post(f"{base}/v1/pops", json=pops, headers=headers) as r:
                        assert r.status == 200  # up to 8 MB: past any kernel buffers
                    posted += 50
            assert await until(lambda: hub.counters["slow_consumers_dropped"] == 1)
            assert await until(lambda: not hub.browser_streams)
            # nothing acked, nothing lost: every pop waits for the browser's return
            assert len(hub.delivery.pending) == posted
            assert any(p.sent for p in hub.delivery.pending.values())
            writer.close()

    run(body())


def test_events_reach_a_stream_under_tls(tmp_path: Any) -> None:
    client_ssl, tls = tls_pair(tmp_path)

    async def body() -> None:
        async with inprocess_hub(**hub_options(**tls)) as hub:
            base = http_of(hub, "https")
            client = BrowserClient(base, ssl=client_ssl)
            try:
                assert (await client.login(TOKEN)).status == 200
                stream = await client.stream("telephone", ["1001"])
                await stream.next(("ready",))
                pop = {"media": "telephone", "resource": "1001", "source": "0612345678"}
                async with (
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as http,
                    http.post(
                        f"{base}/v1/pops", json=pop, headers={"Authorization": f"Bearer {SOURCE}"}
                    ) as r,
                ):
                    pop_id = (await r.json())["ids"][0]
                event = await stream.next()
                assert (event.event, event.id, event.json()["source"]) == (
                    "pop",
                    pop_id,
                    "0612345678",
                )
                await stream.close()
            finally:
                await client.close()

    run(body())
