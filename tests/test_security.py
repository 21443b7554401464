"""Nobody let in: loopback by default, tokens on both ports, TLS with a certificate made here,
and event fields that stay data all the way to the actions."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner

from conftest import HubThread, wait_for
from hubproc import LOOPBACK, HubProcess, RawClient, address_of, inprocess_hub, run, until
from spop_cli import Error, ListenerStatus, ScreenPopError
from spop_cli.cli import cli
from spop_cli.hub import server as hub_server
from spop_cli.hub.server import HubConfig
from spop_cli.listener.core import AsyncListener
from spop_cli.serve import build_hub_config, exposure_warnings

DESK, PUBLISHER = "desk-secret", "publisher-secret"


def http(
    url: str, body: Any = None, token: str | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def listener_up(
    address: str, resource: str, **options: Any
) -> tuple[AsyncListener, list[Any]]:
    listener = AsyncListener("telephone", reconnecting_interval=0.3, **options)
    got: list[Any] = []
    listener.on_screen_pop(got.append)
    await listener.initialize(address)
    await listener.start_listening(resource)
    return listener, got


# -- loopback by default -----------------------------------------------------------------------


def test_hub_binds_loopback_unless_told() -> None:
    assert HubConfig().host == "127.0.0.1"
    assert build_hub_config(no_journal=True).host == "127.0.0.1"


@pytest.mark.parametrize(
    "options, warned",
    [
        ({"host": "127.0.0.1"}, []),
        ({"host": "::1"}, []),
        ({"host": "localhost"}, []),
        ({"host": "0.0.0.0"}, ["without a token", "without TLS"]),
        ({"host": "192.0.2.10", "token": "t"}, ["without TLS"]),
        ({"host": "", "token": "t", "tls_cert": "c", "tls_key": "k"}, []),
        ({"host": "::", "tls_cert": "c", "tls_key": "k"}, ["without a token"]),
    ],
)
def test_exposure_warnings(options: dict[str, Any], warned: list[str]) -> None:
    warnings = exposure_warnings(HubConfig(**options))
    assert len(warnings) == len(warned)
    for warning, words in zip(warnings, warned, strict=True):
        assert words in warning


def test_serve_warns_when_listening_beyond_loopback_without_token(tmp_path: Path) -> None:
    hub = HubProcess(tmp_path, journal=False, host="0.0.0.0")
    with hub:
        assert "warning: listening on 0.0.0.0 without a token" in hub.output()


# -- tokens ------------------------------------------------------------------------------------


def test_listener_needs_the_token() -> None:
    async def body() -> None:
        async with inprocess_hub(token=DESK, source_token=PUBLISHER) as hub:
            for token in (None, "wrong", DESK.upper(), DESK + " "):
                listener = AsyncListener("telephone", token=token)
                with pytest.raises(ScreenPopError) as caught:
                    await listener.initialize(address_of(hub))
                assert caught.value.code is Error.SCREENPOP_Initialization_Error
                assert listener.status is ListenerStatus.Status_Down
            assert hub.status()["counters"]["auth_failures"] == 4
            assert hub.status()["counters"].get("frame_errors", 0) == 0  # not bad frames
            listener, got = await listener_up(address_of(hub), "13579", token=DESK)
            await hub.publish({"media": "telephone", "resource": "13579", "source": "12345"})
            assert await until(lambda: len(got) == 1)
            await listener.shutdown()

    run(body())


@pytest.mark.parametrize("token", [7, ["desk-secret"], {"t": "desk-secret"}, True, ""])
def test_tokens_of_the_wrong_type_are_refused(token: Any) -> None:
    async def body() -> None:
        async with inprocess_hub(token=DESK) as hub:
            raw = await RawClient.open(hub.port)
            await raw.send({"op": "hello", "version": 1, "ref": 1, "token": token})
            frames = await raw.frames_until_closed()
            assert frames == [
                {
                    "op": "error",
                    "code": "SCREENPOP_Initialization_Error",
                    "message": "wrong or missing token",
                    "ref": 1,
                    "fatal": True,
                }
            ]

    run(body())


def test_listener_token_cannot_publish_on_the_listener_port() -> None:
    async def body() -> None:
        async with inprocess_hub(token=DESK, source_token=PUBLISHER) as hub:
            raw = await RawClient.open(hub.port)
            await raw.hello(token=DESK)
            answer = await raw.request("publish", pops={"media": "telephone", "resource": "1"})
            assert answer["op"] == "error" and answer["code"] == "SCREENPOP_Initialization_Error"
            assert "may not publish" in answer["message"]
            assert (await raw.request("register", media="telephone", resource="1"))[
                "op"
            ] == "ok"  # not fatal
            assert hub.status()["counters"].get("pops_accepted", 0) == 0
            raw.close()
            publisher = await RawClient.open(hub.port)
            await publisher.hello(token=PUBLISHER)
            answer = await publisher.request(
                "publish", pops={"media": "telephone", "resource": "1"}
            )
            assert answer["op"] == "ok" and len(answer["ids"]) == 1
            publisher.close()

    run(body())


@pytest.fixture
def guarded_hub() -> Any:
    running = HubThread(token=DESK, source_token=PUBLISHER)
    yield running
    running.close()


@pytest.mark.parametrize(
    "token, status, error",
    [
        (None, 401, "unauthorized"),
        ("wrong", 401, "unauthorized"),
        (DESK, 403, "forbidden"),
        (PUBLISHER, 200, None),
    ],
)
def test_http_publishing_needs_the_source_token(
    guarded_hub: HubThread, token: str | None, status: int, error: str | None
) -> None:
    pop = {"media": "telephone", "resource": "13579"}
    for path, body in (
        ("/v1/pops", pop),
        ("/v1/contacts", {"contact_id": "c", "event": "queued", "at": "2026-01-01T00:00:00Z"}),
    ):
        got, answer = http(f"{guarded_hub.http}{path}", body, token)
        if error is None:
            assert got in (200, 422) and answer.get("error") not in ("unauthorized", "forbidden")
        else:
            assert (got, answer["error"]) == (status, error)


def test_http_status_needs_a_token_health_does_not(guarded_hub: HubThread) -> None:
    assert http(f"{guarded_hub.http}/v1/status")[0] == 401
    assert http(f"{guarded_hub.http}/v1/status", token="nope")[0] == 401
    assert http(f"{guarded_hub.http}/v1/status", token=DESK)[0] == 200
    status, answer = http(f"{guarded_hub.http}/v1/health")
    assert status == 200 and answer == {"status": "ok", "version": answer["version"]}


@pytest.mark.parametrize(
    ("token", "status"), [(None, 401), ("wrong", 401), (DESK, 401), (PUBLISHER, 200)]
)
def test_with_a_source_token_alone_publishing_without_it_is_401(
    token: str | None, status: int
) -> None:
    """The docs' table: nothing or a wrong token → 401 (it was 403 "this token may listen but
    not publish" here, where no token is needed to listen)."""

    async def body() -> None:
        async with inprocess_hub(source_token=PUBLISHER) as hub:
            url = f"http://127.0.0.1:{hub.http_port}/v1/pops"
            got, answer = await asyncio.to_thread(
                http, url, {"media": "telephone", "resource": "13579"}, token
            )
            assert got == status
            if status == 401:
                assert answer == {
                    "error": "unauthorized",
                    "message": "wrong or missing bearer token",
                }

    run(body())


def test_source_token_alone_leaves_listening_open_but_not_publishing() -> None:
    async def body() -> None:
        async with inprocess_hub(source_token=PUBLISHER) as hub:
            listener, got = await listener_up(address_of(hub), "13579")
            raw = await RawClient.open(hub.port)
            await raw.hello()
            answer = await raw.request("publish", pops={"media": "telephone", "resource": "13579"})
            assert answer["op"] == "error" and "may not publish" in answer["message"]
            raw.close()
            await hub.publish({"media": "telephone", "resource": "13579"})
            assert await until(lambda: len(got) == 1)
            await listener.shutdown()

    run(body())


def test_spop_send_takes_the_token_from_spop_token(guarded_hub: HubThread) -> None:
    runner = CliRunner()
    args = ["send", "telephone", "13579", "--server", guarded_hub.address, "--source", "12345"]
    refused = runner.invoke(cli, args, env={"SPOP_TOKEN": DESK})
    assert refused.exit_code == 5 and "SCREENPOP_Initialization_Error" in refused.output
    missing = runner.invoke(cli, args, env={"SPOP_TOKEN": ""})
    assert missing.exit_code == 5
    sent = runner.invoke(cli, args, env={"SPOP_TOKEN": PUBLISHER})
    assert sent.exit_code == 0, sent.output
    assert guarded_hub.status()["pending"] == 1


def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hub_server.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hub_server.hmac, "compare_digest", spy)
    hub = hub_server.Hub(HubConfig(token=DESK, source_token=PUBLISHER))
    assert hub.authorize("guess") is None
    assert hub.authorize(DESK) == "listener"
    assert hub.authorize(PUBLISHER) == "source"
    assert (b"guess", PUBLISHER.encode()) in compared and (b"guess", DESK.encode()) in compared


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA and a hub certificate for 127.0.0.1 and localhost, as PEM files."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    cert = ca.issue_cert(LOOPBACK, "localhost")
    paths = {"ca": folder / "ca.pem", "cert": folder / "hub.pem", "key": folder / "hub.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    client = ssl.create_default_context(cafile=str(paths["ca"]))
    return {**paths, "client": client}


def test_tls_on_both_ports(pki: dict[str, Any]) -> None:
    async def body() -> None:
        async with inprocess_hub(tls_cert=str(pki["cert"]), tls_key=str(pki["key"])) as hub:
            for address in (address_of(hub), f"{hub.port}@localhost"):
                listener, got = await listener_up(address, "13579", ssl_context=pki["client"])
                url = f"https://{LOOPBACK}:{hub.http_port}/v1/pops"
                status, answer = await asyncio.to_thread(
                    http,
                    url,
                    {"media": "telephone", "resource": "13579", "source": "tls"},
                    None,
                    pki["client"],
                )
                assert status == 200
                assert await until(lambda got=got: len(got) == 1)
                assert got[0].source == "tls" and got[0].id == answer["ids"][0]
                await listener.shutdown()

    run(body())


def test_tls_hub_refuses_clear_text_and_unverified_clients(pki: dict[str, Any]) -> None:
    async def body() -> None:
        async with inprocess_hub(tls_cert=str(pki["cert"]), tls_key=str(pki["key"])) as hub:
            raw = await RawClient.open(hub.port)
            await raw.send({"op": "hello", "version": 1, "ref": 1})
            try:
                frame = await raw.frame()
            except (ConnectionError, ValueError):  # a TLS alert is no JSON
                frame = None
            assert frame is None  # closed without a welcome
            # a client that does not trust the hub's CA does not connect
            untrusting = AsyncListener(
                "telephone", ssl_context=ssl.create_default_context(), timeout=3
            )
            with pytest.raises(ScreenPopError) as caught:
                await untrusting.initialize(address_of(hub))
            assert caught.value.code is Error.SCREENPOP_Cannot_Find_HiPath_ProCenter
            with pytest.raises(urllib.error.URLError):
                await asyncio.to_thread(
                    http,
                    f"https://{LOOPBACK}:{hub.http_port}/v1/health",
                    None,
                    None,
                    ssl.create_default_context(),
                )
            # and the hub serves on
            listener, _ = await listener_up(address_of(hub), "1", ssl_context=pki["client"])
            await listener.shutdown()

    run(body())


def test_spop_send_with_cafile(pki: dict[str, Any]) -> None:
    tls = HubThread(tls_cert=str(pki["cert"]), tls_key=str(pki["key"]))
    try:
        args = ["send", "email", "mmartin", "--server", tls.address, "--source", "a@example.org"]
        result = CliRunner().invoke(cli, [*args, "--cafile", str(pki["ca"])])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(cli, args)  # no CA: the hub's certificate is not trusted
        assert result.exit_code == 3 and "SCREENPOP_Cannot_Find_HiPath_ProCenter" in result.output
        # the hint says TLS failed (it said "No hub answers there")
        assert f"  The hub at {tls.address} answered, but TLS failed" in result.output
        assert "No hub answers there" not in result.output
        assert tls.status()["pending"] == 1
    finally:
        tls.close()


# -- fields are data -----------------------------------------------------------------------------

HOSTILE = {
    "source": "$(touch PWNED); `touch PWNED`; rm -rf ~ &",
    "destination": "{0.__class__.__mro__} %s %n %(x)s ${HOME} {source}",
    "queue_name": "'; DROP TABLE pops; --",
    "contact_description": "a\nb\r\nc\t\x1b[31mred\x1b[0m | tee /etc/passwd > /dev/null",
    "from": "../../etc/passwd",
    "redirect": "http://evil.example/?q=1&x=<script>",
    "contact_data": {"k;ls": "$(id)", "url": "a b&c=d#e", "$HOME": "`whoami`"},
}


def test_hostile_fields_travel_verbatim(
    hub: HubThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spop_cli import ScreenPopTelephoneListener

    monkeypatch.chdir(tmp_path)
    listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
    got: list[Any] = []
    listener.on_screen_pop(got.append)
    listener.initialize(hub.address)
    listener.start_listening("13579")
    status, _ = http(f"{hub.http}/v1/pops", {"media": "telephone", "resource": "13579", **HOSTILE})
    assert status == 200
    result = CliRunner().invoke(
        cli,
        [
            "send",
            "telephone",
            "13579",
            "--server",
            hub.address,
            "--source",
            HOSTILE["source"],
            "--queue",
            HOSTILE["queue_name"],
            "--data",
            "k;ls=$(id)",
            "--data",
            "url=a b&c=d#e",
        ],
    )
    assert result.exit_code == 0, result.output
    assert wait_for(lambda: len(got) == 2)
    for event in got:
        assert event.source == HOSTILE["source"] and event.queue_name == HOSTILE["queue_name"]
        assert event.contact_data["k;ls"] == "$(id)" and event.contact_data["url"] == "a b&c=d#e"
    first = got[0]
    assert (first.destination, first.contact_description, first.from_, first.redirect) == (
        HOSTILE["destination"],
        HOSTILE["contact_description"],
        HOSTILE["from"],
        HOSTILE["redirect"],
    )
    # the command action hands them to a program as single arguments, never to a shell
    from spop_cli.actions.command import CommandAction

    script = "import sys, json; open('args.json', 'w').write(json.dumps(sys.argv[1:]))"
    CommandAction(
        {
            "argv": [
                sys.executable,
                "-c",
                script,
                "{source}",
                "{destination}",
                "{contact_description}",
            ]
        }
    ).run(first)
    assert json.loads((tmp_path / "args.json").read_text()) == [
        HOSTILE["source"],
        HOSTILE["destination"],
        HOSTILE["contact_description"],
    ]
    assert not (tmp_path / "PWNED").exists()
    # the url action percent-encodes every value: data adds no parameter, path or fragment
    from urllib.parse import parse_qs, urlsplit

    from spop_cli.actions.url import UrlAction

    url = UrlAction(
        {"url": "https://crm.example/search?q={redirect}&data={contact_data[url]}"}
    ).url_for(first)
    parts = urlsplit(url)
    assert (parts.netloc, parts.path, parts.fragment) == ("crm.example", "/search", "")
    assert parse_qs(parts.query) == {"q": [HOSTILE["redirect"]], "data": ["a b&c=d#e"]}
    listener.shutdown()
