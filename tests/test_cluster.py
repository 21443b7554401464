"""The NATS JetStream backend (`[hub] backend = "nats"`): a real nats-server started here."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import HubThread, wait_for
from natsproc import NatsCluster
from spop_cli import ListenerStatus, ScreenPopTelephoneListener
from spop_cli.config import validate
from spop_cli.hub.delivery import InProcessDelivery
from spop_cli.hub.nats_delivery import NatsDelivery, resource_token, token_resource
from spop_cli.hub.server import Hub, HubConfig

S = ListenerStatus


def test_embedded_is_the_default_backend() -> None:
    assert HubConfig().backend == "embedded"
    assert type(Hub(HubConfig()).delivery) is InProcessDelivery


def test_backend_nats_chooses_jetstream() -> None:
    assert type(Hub(HubConfig(backend="nats")).delivery) is NatsDelivery


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("backend", "nats", None),
        ("backend", "embedded", None),
        ("backend", "kafka", "must be one of 'embedded', 'nats'"),
        ("nats_servers", "nats://127.0.0.1:4222", None),
        ("nats_servers", "nats://a:4222,tls://b:4222", None),
        ("nats_servers", "a:4222", "'a:4222' is not a nats://HOST:PORT URL"),
        (
            "nats_servers",
            "",
            "must be a string like nats://127.0.0.1:4222 (comma-separated for a cluster)",
        ),
        ("nats_replicas", 1, None),
        ("nats_replicas", 5, None),
        ("nats_replicas", 0, "must be an integer from 1 to 5 (JetStream's limit)"),
        ("nats_replicas", 6, "must be an integer from 1 to 5 (JetStream's limit)"),
        ("nats_stream", "SPOP_2", None),
        ("nats_stream", "a.b", "must be 1 to 64 letters, digits, - or _"),
        ("nats_kv_bucket", "x" * 64, None),
        ("nats_kv_bucket", "x" * 65, "must be 1 to 64 letters, digits, - or _"),
        ("nats_token", "", "must be a non-empty string"),
        ("nats_creds", "/no/such/file.creds", "file not found"),
        ("nats_timeout", 0, "must be greater than 0"),
    ],
)
def test_nats_settings_are_checked(key: str, value: Any, message: str | None) -> None:
    problems = validate({"hub": {key: value}})
    assert [p.message for p in problems] == ([] if message is None else [message])


def test_nats_tls_cert_needs_its_key(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    problems = validate({"hub": {"nats_tls_cert": str(cert)}})
    assert [p.path for p in problems] == ["hub.nats_tls_cert"]


@pytest.mark.parametrize(
    "resource", ["1234", "a.b", "*", ">", "with space", "élan", "a/b", "x" * 40]
)
def test_resource_tokens_are_safe_subject_tokens(resource: str) -> None:
    token = resource_token(resource)
    assert all(c.isalnum() or c in "-_" for c in token)
    assert token_resource(token) == resource


def nats_hub(cluster: NatsCluster, **options: Any) -> HubThread:
    return HubThread(backend="nats", nats_servers=cluster.servers, **options)


@pytest.fixture
def nats1(tmp_path: Path) -> Any:
    cluster = NatsCluster(tmp_path, 1)
    yield cluster
    cluster.close()


def listen(address: str, resource: str, interval: float = 0.3) -> tuple[Any, list[str]]:
    listener = ScreenPopTelephoneListener(reconnecting_interval=interval)
    got: list[str] = []
    lock = threading.Lock()

    @listener.on_screen_pop
    def on_pop(event: Any) -> None:
        with lock:
            got.append(event.id)

    listener.initialize(address)
    listener.start_listening(resource)
    return listener, got


def test_single_node_round_trip(nats1: NatsCluster) -> None:
    hub = nats_hub(nats1)
    try:
        # a pop accepted before anyone listens waits in the stream
        assert hub.publish({"id": "early", "media": "telephone", "resource": "a.b c"}) == ["early"]
        listener, got = listen(hub.address, "a.b c")
        assert wait_for(lambda: got == ["early"])
        hub.publish({"id": "live", "media": "telephone", "resource": "a.b c"})
        assert wait_for(lambda: got == ["early", "live"])
        hub.publish({"id": "live", "media": "telephone", "resource": "a.b c"})  # a resend
        assert wait_for(lambda: hub.status()["counters"]["acked"] == 2)
        status = hub.status()
        assert status["counters"]["duplicates"] == 1
        assert status["counters"]["pops_accepted"] == 2
        assert status["pending"] == 0
        assert got == ["early", "live"]
        listener.shutdown()
    finally:
        hub.close()


def test_two_hubs_share_pops_and_a_listener_fails_over(nats1: NatsCluster) -> None:
    a, b = nats_hub(nats1), nats_hub(nats1)
    try:
        listener, got = listen(f"{a.address},{b.address}", "7001")
        b.publish(
            {"id": "via-b", "media": "telephone", "resource": "7001"}
        )  # B's source, A's listener
        assert wait_for(lambda: got == ["via-b"] and a.status()["counters"]["acked"] == 1)
        # stop A's listener from acking: a pop it receives stays unacked in the stream
        listener._core._link.send = lambda data: None  # type: ignore[attr-defined]
        b.publish({"id": "unacked", "media": "telephone", "resource": "7001"})
        assert wait_for(lambda: got == ["via-b", "unacked"])
        a.stop()
        # Up on B; B reads the key's history: `unacked` comes again, is acked, runs nothing twice
        assert wait_for(lambda: listener.status is S.Status_Up and b.status()["registrations"] == 1)
        assert wait_for(lambda: b.status()["counters"]["acked"] == 1)
        b.publish({"id": "after", "media": "telephone", "resource": "7001"})
        assert wait_for(lambda: got == ["via-b", "unacked", "after"])
        assert wait_for(lambda: b.status()["pending"] == 0)
        listener.shutdown()
    finally:
        a.close()
        b.close()


def play_alternating(hubs: list[HubThread], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each event to the next hub in turn; the pops the hubs accepted, in order, without the
    fields that differ from run to run."""
    pops: list[dict[str, Any]] = []
    for hub in hubs:
        assert hub.hub is not None
        hub.hub.on_pop = pops.append
    for index, event in enumerate(events):
        hub = hubs[index % len(hubs)]
        assert hub.hub is not None
        hub.call(hub.hub.apply_contacts(event))
    for pop in pops:
        pop.pop("id")
        pop.pop("created_at")
    return pops


def test_a_contact_alternating_between_hubs_pops_as_on_one_hub(nats1: NatsCluster) -> None:
    """Every scenario: its events sent to hub A, B, A, … give the pops one embedded hub gives."""
    from datetime import UTC, datetime

    from spop_cli.scenario import builtin_names, load_scenario, timeline

    start = datetime(2024, 5, 14, 9, 0, 0, tzinfo=UTC)
    embedded = HubThread()
    a, b = nats_hub(nats1), nats_hub(nats1)
    try:
        for name in builtin_names():
            events = timeline(load_scenario(name), start, contact_suffix="-" + name)
            alone = play_alternating([embedded], events)
            shared = play_alternating([a, b], events)
            assert shared == alone, name
            assert alone, name
    finally:
        embedded.close()
        a.close()
        b.close()


@pytest.mark.chaos  # three nodes to start (6 s): with the chaos tests, which all run on three
def test_three_node_cluster_with_three_replicas(tmp_path: Path) -> None:
    """The stream and the bucket replicated on three nodes; hubs on different nodes share pops."""
    cluster = NatsCluster(tmp_path, 3)
    urls = [node.url for node in cluster.nodes]
    hubs = [
        HubThread(backend="nats", nats_servers=",".join(urls[i:] + urls[:i]), nats_replicas=3)
        for i in range(2)
    ]
    try:
        listener, got = listen(hubs[0].address, "3004")
        hubs[1].publish({"id": "r3", "media": "telephone", "resource": "3004"})
        assert wait_for(lambda: got == ["r3"])

        def info() -> Any:
            return hubs[0].call(hubs[0].hub.delivery.js.stream_info("SPOP"))  # type: ignore[union-attr]

        assert info().config.num_replicas == 3
        # a leader and two followers
        assert wait_for(lambda: len(info().cluster.replicas or []) == 2)
        listener.shutdown()
    finally:
        for hub in hubs:
            hub.close()
        cluster.close()


@pytest.mark.chaos  # a stream leader's loss pauses writes for JetStream's election (4-9 s)
def test_three_node_cluster_survives_a_node_killed(tmp_path: Path) -> None:
    """Replicas 3: SIGKILL the node both hubs talk to; pops accepted before and after all arrive,
    each callback run once."""
    cluster = NatsCluster(tmp_path, 3)
    hubs = [nats_hub(cluster, nats_replicas=3) for _ in range(2)]
    try:
        listener, got = listen(hubs[0].address, "3003")
        hubs[1].publish({"id": "before", "media": "telephone", "resource": "3003"})
        assert wait_for(lambda: got == ["before"])
        cluster.nodes[0].kill()  # first in every hub's server list: the one they are connected to
        for n in range(5):
            # a write may wait for the new stream leader; the source retries a 503 like this
            assert wait_for(lambda n=n: _try_publish(hubs[1], f"after-{n}"), timeout=30)
        expected = ["before"] + [f"after-{n}" for n in range(5)]
        assert wait_for(lambda: sorted(got) == sorted(expected), timeout=30)
        assert len(got) == len(set(got))
        listener.shutdown()
    finally:
        for hub in hubs:
            hub.close()
        cluster.close()


def _try_publish(hub: HubThread, pop_id: str) -> bool:
    try:
        hub.publish({"id": pop_id, "media": "telephone", "resource": "3003"})
    except Exception:
        return False
    return True


def test_an_ended_contact_on_one_hub_withdraws_its_pop_on_the_other(nats1: NatsCluster) -> None:
    a, b = nats_hub(nats1), nats_hub(nats1)
    try:
        assert a.hub is not None and b.hub is not None
        queued = {"contact_id": "c-end", "event": "queued", "media": "telephone", "source": "1"}
        routed = {"contact_id": "c-end", "event": "routed", "resource": "5150"}
        a.call(a.hub.apply_contacts([queued, routed]))
        kept = {"contact_id": "c-kept", "event": "routed", "media": "telephone", "resource": "5150"}
        kept_pops = a.call(a.hub.apply_contacts(kept))["pops"]
        b.call(b.hub.apply_contacts({"contact_id": "c-end", "event": "ended"}))
        # the listener comes to A, which reads the key's history: the ended contact's pop is gone
        listener, got = listen(a.address, "5150")
        assert wait_for(lambda: got == kept_pops)
        assert wait_for(lambda: a.status()["pending"] == 0)
        listener.shutdown()
        assert b.hub.contacts.state("c-end")["ended_seen"] is not None  # type: ignore[index]
    finally:
        a.close()
        b.close()


def test_a_resent_event_id_on_another_hub_applies_once(nats1: NatsCluster) -> None:
    a, b = nats_hub(nats1), nats_hub(nats1)
    try:
        assert a.hub is not None and b.hub is not None
        event = {
            "id": "ev-1",
            "contact_id": "c-ev",
            "event": "routed",
            "media": "telephone",
            "resource": "6",
        }
        first = a.call(a.hub.apply_contacts(event))
        again = b.call(b.hub.apply_contacts(event))
        assert len(first["pops"]) == 1
        assert again == {"applied": 1, "pops": []}  # as one embedded hub answers a resend
        assert b.status()["counters"]["duplicate_events"] == 1
        listener, got = listen(b.address, "6")
        assert wait_for(lambda: got == first["pops"])
        listener.shutdown()
    finally:
        a.close()
        b.close()


def test_ended_on_a_hub_started_after_the_pop_still_withdraws_it(nats1: NatsCluster) -> None:
    """The keys a contact popped travel in its KV state: a hub that never saw the pop withdraws
    it all the same."""
    a = nats_hub(nats1)
    try:
        assert a.hub is not None
        routed = {"contact_id": "c-late", "event": "routed", "media": "telephone", "resource": "77"}
        a.call(a.hub.apply_contacts(routed))
    finally:
        a.close()
    late = nats_hub(nats1)
    try:
        assert late.hub is not None
        late.call(late.hub.apply_contacts({"contact_id": "c-late", "event": "ended"}))
        listener, got = listen(late.address, "77")
        late.publish({"id": "marker", "media": "telephone", "resource": "77"})
        assert wait_for(lambda: got == ["marker"])  # the ended contact's pop never came
        listener.shutdown()
    finally:
        late.close()


def test_serve_without_a_reachable_nats_says_so_and_exits(tmp_path: Path) -> None:
    import subprocess
    import sys

    from natsproc import free_ports

    config = tmp_path / "hub.toml"
    port = free_ports(1)[0]  # nothing listens there
    config.write_text(
        f'[hub]\nbackend = "nats"\nnats_servers = "nats://127.0.0.1:{port}"\nnats_timeout = 0.25\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "spop_cli", "serve", "--config", str(config), "--port", "0"]
        + ["--http-port", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "SPOP_DIAG_DIR": str(tmp_path / "diag")},
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        f"spop: error: hub.nats_servers: no NATS server answers at nats://127.0.0.1:{port}"
        " within 0.5 s (last error: connection refused)"
    )
