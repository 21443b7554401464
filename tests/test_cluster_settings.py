"""Hubs of one cluster started with other settings: the shared stream and bucket are never
lowered; a second spop cluster on the same NATS account is refused in one line."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import HubThread, wait_for
from natsproc import CutProxy, NatsCluster
from spop_cli.hub.nats_delivery import NatsUnavailable
from test_cluster import listen


@pytest.fixture
def nats1(tmp_path: Path) -> Any:
    cluster = NatsCluster(tmp_path, 1)
    yield cluster
    cluster.close()


def stream_config(cluster: NatsCluster, name: str = "SPOP") -> dict[str, Any]:
    """max_age, duplicate_window (s) and replicas of a stream, read from JetStream."""
    import nats

    async def read() -> dict[str, Any]:
        nc = await nats.connect([node.url for node in cluster.nodes])
        try:
            config = (await nc.jetstream().stream_info(name)).config
            return {
                "max_age": config.max_age,
                "duplicate_window": config.duplicate_window,
                "replicas": config.num_replicas,
            }
        finally:
            await nc.close()

    return asyncio.run(read())


def test_a_hub_with_lower_settings_leaves_the_stream_as_it_was(
    nats1: NatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    first = HubThread(backend="nats", nats_servers=nats1.servers)  # pop_ttl 120, dedupe 120
    try:
        assert stream_config(nats1) == {"max_age": 120.0, "duplicate_window": 120.0, "replicas": 1}
        with caplog.at_level(logging.WARNING, logger="spop.hub"):
            second = HubThread(
                backend="nats", nats_servers=nats1.servers, pop_ttl=30, dedupe_window=5
            )
        try:
            assert stream_config(nats1) == {
                "max_age": 120.0,
                "duplicate_window": 120.0,
                "replicas": 1,
            }
            assert (
                "stream SPOP keeps max_age 120 s (this hub's pop_ttl/dedupe_window asks 30 s), "
                "duplicate_window 120 s (this hub's dedupe_window asks 5 s): a hub never lowers "
                "the shared stream; change it with `nats stream edit SPOP`"
            ) in caplog.messages
            # the resend, 7 s later in the lab, stays within the stream's window: stored once
            pop = {"id": "once", "media": "telephone", "resource": "1"}
            assert second.publish(pop) == ["once"]
            first.publish(pop)
            assert first.status()["counters"]["duplicates"] == 1
        finally:
            second.close()
    finally:
        first.close()


def test_a_hub_with_higher_settings_raises_them(nats1: NatsCluster) -> None:
    first = HubThread(backend="nats", nats_servers=nats1.servers, pop_ttl=30, dedupe_window=5)
    try:
        assert stream_config(nats1) == {"max_age": 30.0, "duplicate_window": 5.0, "replicas": 1}
        second = HubThread(backend="nats", nats_servers=nats1.servers, pop_ttl=60)
        try:
            assert stream_config(nats1) == {
                "max_age": 120.0,
                "duplicate_window": 120.0,
                "replicas": 1,
            }
        finally:
            second.close()
    finally:
        first.close()


def test_a_hub_with_another_contact_idle_expiry_binds_to_the_bucket(
    nats1: NatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    first = HubThread(backend="nats", nats_servers=nats1.servers)
    try:
        with caplog.at_level(logging.WARNING, logger="spop.hub"):
            second = HubThread(backend="nats", nats_servers=nats1.servers, contact_idle_expiry=60)
        try:
            assert (
                "KV bucket spop-contacts keeps ttl 14400 s (this hub's contact_idle_expiry asks "
                "60 s): the bucket is shared; change it with `nats kv edit spop-contacts`"
            ) in caplog.messages
            # contact state written by one hub is read by the other
            event = {"contact_id": "c1", "event": "queued", "media": "telephone", "source": "1"}
            assert first.hub is not None and second.hub is not None
            first.call(first.hub.apply_contacts([event]))
            loaded = second.call(second.hub.delivery.load_contacts({"c1"}))
            assert loaded["c1"][0] is not None
        finally:
            second.close()
    finally:
        first.close()


def test_a_second_stream_name_on_the_same_subjects_is_one_clear_error(
    nats1: NatsCluster,
) -> None:
    first = HubThread(backend="nats", nats_servers=nats1.servers)
    try:
        with pytest.raises(NatsUnavailable) as caught:
            HubThread(
                backend="nats",
                nats_servers=nats1.servers,
                nats_stream="OTHER",
                nats_kv_bucket="other",
            )
        assert str(caught.value) == (
            "hub.nats_stream: the subjects spop.> are taken by another stream than OTHER "
            "(another nats_stream name?): one spop cluster per NATS account; give every hub "
            "the same nats_stream, or use another account"
        )
    finally:
        first.close()


@pytest.mark.chaos  # three nodes to start (6 s): with the chaos tests, which all run on three
def test_a_hub_with_one_replica_leaves_an_r3_stream_at_r3(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = NatsCluster(tmp_path, 3)
    try:
        first = HubThread(backend="nats", nats_servers=cluster.servers, nats_replicas=3)
        try:
            assert stream_config(cluster)["replicas"] == 3
            with caplog.at_level(logging.WARNING, logger="spop.hub"):
                second = HubThread(backend="nats", nats_servers=cluster.servers, nats_replicas=1)
            try:
                assert stream_config(cluster)["replicas"] == 3
                assert (
                    "stream SPOP keeps replicas 3 (this hub's nats_replicas asks 1): a hub never "
                    "lowers the shared stream; change it with `nats stream edit SPOP`"
                ) in caplog.messages
                assert (
                    "KV bucket spop-contacts keeps replicas 3 (this hub's nats_replicas asks 1): "
                    "the bucket is shared; change it with `nats kv edit spop-contacts`"
                ) in caplog.messages
                assert second.publish({"id": "p", "media": "telephone", "resource": "1"}) == ["p"]
            finally:
                second.close()
        finally:
            first.close()
    finally:
        cluster.close()


def test_the_hub_connects_to_the_first_server_listed(tmp_path: Path) -> None:
    """nats-py shuffles its server list unless told not to: the order given is the order tried."""
    nodes = [NatsCluster(tmp_path / name, 1) for name in ("n1", "n2", "n3")]
    try:
        n1, n2, n3 = (cluster.nodes[0].url for cluster in nodes)
        hub = HubThread(backend="nats", nats_servers=f"{n3},{n1},{n2}")
        try:
            for _ in range(6):  # a shuffled list starts with n3 one time in three
                assert hub.hub is not None
                connected = hub.hub.delivery.nc.connected_url
                assert f"nats://{connected.netloc}" == n3
                hub.stop()
                hub.start()
        finally:
            hub.close()
    finally:
        for cluster in nodes:
            cluster.close()


def post_pop(hub: HubThread, pop_id: str, resource: str) -> tuple[int, dict[str, Any]]:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        hub.http + "/v1/pops",
        data=json.dumps({"id": pop_id, "media": "telephone", "resource": resource}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


NOT_CONNECTED = (  # a hub whose link to NATS is down, to a source
    503,
    {
        "error": "journal_unavailable",
        "message": "this hub is not connected to NATS (reconnecting): nothing was accepted; "
        "retry later, or on another hub",
    },
)


def test_a_pop_refused_while_cut_off_from_nats_is_never_stored(nats1: NatsCluster) -> None:
    """While its link to NATS is down a hub answers 503 at once, and nothing it refused goes
    out when the link comes back (nats-py would buffer it: the source, told to retry, would
    then have it twice)."""
    proxy = CutProxy(nats1.nodes[0].port)
    cut = HubThread(backend="nats", nats_servers=proxy.url, nats_timeout=5)
    other = HubThread(backend="nats", nats_servers=nats1.servers)
    try:
        listener, got = listen(other.address, "4242")
        assert wait_for(lambda: other.status()["registrations"] == 1)
        assert post_pop(cut, "before", "4242")[0] == 200
        assert wait_for(lambda: got == ["before"])
        proxy.cut()
        assert cut.hub is not None
        delivery = cut.hub.delivery
        assert wait_for(lambda: not delivery.nc.is_connected)
        assert post_pop(cut, "refused", "4242") == NOT_CONNECTED
        proxy.heal()
        assert wait_for(lambda: delivery.nc.is_connected, timeout=15)
        assert post_pop(cut, "after", "4242")[0] == 200
        assert wait_for(lambda: got == ["before", "after"])
        assert got == ["before", "after"]  # `refused` never reached the stream
        listener.shutdown()
    finally:
        other.close()
        cut.close()
        proxy.close()


def serve_nats(tmp_path: Path, *settings: str) -> subprocess.CompletedProcess:
    """`spop serve` of a NATS hub that must fail to start: its exit status and standard error."""
    config = tmp_path / "hub.toml"
    config.write_text('[hub]\nport = 0\nhttp_port = -1\nbackend = "nats"\n' + "\n".join(settings))
    env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag")}
    return subprocess.run(
        [sys.executable, "-m", "spop_cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def errors_of(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("spop: error:")]


def test_a_wrong_nats_token_is_named_at_once(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path, 1, token="right")
    try:
        result = serve_nats(tmp_path, f'nats_servers = "{cluster.servers}"', 'nats_token = "wrong"')
    finally:
        cluster.close()
    assert result.returncode == 12, result.stderr
    assert "Traceback" not in result.stderr
    assert errors_of(result) == [
        f"spop: error: hub.nats_token: NATS at {cluster.servers} refused the connection: "
        "Authorization Violation"
    ]


@pytest.mark.chaos  # three nodes to start (6 s): with the chaos tests, which all run on three
def test_a_hub_started_without_quorum_says_so(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path, 3)
    try:
        cluster.nodes[1].kill()
        cluster.nodes[2].kill()
        result = serve_nats(
            tmp_path,
            f'nats_servers = "{cluster.servers}"',
            "nats_replicas = 3",
            "nats_timeout = 2",
        )
    finally:
        cluster.close()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors_of(result)) == 1, result.stderr
    assert errors_of(result)[0].startswith(
        "spop: error: hub.nats_servers: JetStream has no quorum (1 of the 3 nodes of "
        "nats_servers answer): "
    ), result.stderr
    assert errors_of(result)[0].endswith("; start the other nodes"), result.stderr


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def back_up(hub: HubThread, proxy: CutProxy) -> None:
    """The link healed: the hub is connected again and its health check says ok."""
    from spop_cli import __version__

    assert hub.hub is not None
    delivery = hub.hub.delivery
    proxy.heal()
    assert wait_for(lambda: delivery.nc.is_connected, timeout=15)
    assert get_json(hub.http + "/v1/health") == (200, {"status": "ok", "version": __version__})


def test_status_and_health_show_the_link_to_nats(nats1: NatsCluster) -> None:
    """`spop status` and /v1/status name the backend and the link; /v1/health answers 503 while
    the link is down, so the balancer's check (cluster.md) sends sources to another hub."""
    from click.testing import CliRunner

    from spop_cli import __version__
    from spop_cli.cli import cli

    proxy = CutProxy(nats1.nodes[0].port)
    hub = HubThread(backend="nats", nats_servers=proxy.url)

    def status_lines() -> list[str]:
        result = CliRunner(env={"COLUMNS": "160"}).invoke(cli, ["status", "--server", hub.address])
        assert result.exit_code == 0, result.output
        return [" ".join(line.split()) for line in result.output.splitlines()]

    try:
        assert get_json(hub.http + "/v1/health") == (200, {"status": "ok", "version": __version__})
        status = get_json(hub.http + "/v1/status")[1]
        assert (status["backend"], status["nats"]) == (
            "nats",
            {"stream": "SPOP", "replicas": 1, "connected": True, "server": proxy.url},
        )
        assert f"backend NATS JetStream, stream SPOP (replicas 1), via {proxy.url}" in (
            status_lines()
        )
        proxy.cut()
        assert hub.hub is not None
        delivery = hub.hub.delivery
        assert wait_for(lambda: not delivery.nc.is_connected)
        assert get_json(hub.http + "/v1/health") == (
            503,
            {
                "status": "unavailable",
                "version": __version__,
                "reason": "not connected to NATS (reconnecting): pops and contact events get 503",
            },
        )
        assert get_json(hub.http + "/v1/status")[1]["nats"] == {
            "stream": "SPOP",
            "replicas": 1,
            "connected": False,
            "server": None,
        }
        assert (
            "backend NATS JetStream, stream SPOP (replicas 1), NOT CONNECTED (reconnecting: "
            "sources get 503)"
        ) in status_lines()
        back_up(hub, proxy)
    finally:
        hub.close()
        proxy.close()


def test_a_silent_link_to_nats_is_found_by_its_pings(nats1: NatsCluster) -> None:
    """A partition that drops packets without closing anything: the hub's pings to NATS (every
    nats_timeout, two unanswered at most) find it, so the link counts as down (health 503, a
    source told at once) within about 3 x nats_timeout, not after nats-py's default two
    minutes; it comes back by itself."""

    proxy = CutProxy(nats1.nodes[0].port)
    hub = HubThread(backend="nats", nats_servers=proxy.url, nats_timeout=0.5)
    try:
        assert hub.hub is not None
        delivery = hub.hub.delivery
        assert get_json(hub.http + "/v1/health")[0] == 200
        proxy.hold()
        assert wait_for(lambda: not delivery.nc.is_connected, timeout=10)
        assert get_json(hub.http + "/v1/health")[0] == 503
        assert post_pop(hub, "silent", "4242") == NOT_CONNECTED
        back_up(hub, proxy)
    finally:
        hub.close()
        proxy.close()


def test_an_embedded_hub_says_its_backend() -> None:
    hub = HubThread()
    try:
        status = get_json(hub.http + "/v1/status")[1]
        assert (status["backend"], "nats" in status) == ("embedded", False)
    finally:
        hub.close()
