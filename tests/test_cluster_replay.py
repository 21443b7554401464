"""A contact event whose stream writes were lost after its state was stored (backend nats): the
source's resend is a duplicate event, and writes them again (docs/cluster.md, "Contacts")."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import HubThread, wait_for
from natsproc import CutProxy, NatsCluster
from spop_cli import ScreenPopTelephoneListener
from spop_cli.hub.journal import JournalUnavailable
from spop_cli.hub.nats_delivery import NatsUnavailable

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")

ROUTED = {
    "id": "ev-routed",
    "contact_id": "c-1",
    "event": "routed",
    "media": "telephone",
    "resource": "6",
    "source": "+33 1 23",
}


@pytest.fixture
def nats1(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path, 1)
    yield cluster
    cluster.close()


def listen(hub: HubThread, resource: str) -> tuple[Any, list[tuple[str, str]]]:
    listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
    got: list[tuple[str, str]] = []

    @listener.on_screen_pop
    def on_pop(event: Any) -> None:
        got.append((event.id, event.source))

    listener.initialize(hub.address)
    listener.start_listening(resource)
    assert wait_for(lambda: hub.status()["registrations"] == 1)
    return listener, got


def lose_after_state(hub: HubThread, proxy: CutProxy, answer: bool) -> None:
    """The hub's next contact state write is stored, then its link to NATS is cut: the pops'
    writes after it are lost (`answer`), or the write's own answer is (not `answer`)."""
    assert hub.hub is not None
    delivery = hub.hub.delivery
    real = delivery.store_contacts

    async def store_then_cut(states: Any, revisions: Any) -> bool:
        delivery.store_contacts = real
        stored = await real(states, revisions)
        proxy.cut()
        if not answer:
            raise NatsUnavailable("contact state not stored: TimeoutError()")
        return stored

    delivery.store_contacts = store_then_cut


def freeze(pid: int) -> None:
    """SIGSTOP, and wait until every thread of the process has stopped: a request sent after
    this waits for SIGCONT (a busy thread may otherwise answer it first)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        states = [
            (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            for task in Path(f"/proc/{pid}/task").iterdir()
        ]
        if all(state == "T" for state in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop")


def freeze_at_next_state_write(hub: HubThread, pid: int) -> None:
    """The hub's next contact state write is sent to a node frozen just before (`freeze`): it
    waits, unanswered, until SIGCONT."""
    assert hub.hub is not None
    delivery = hub.hub.delivery
    real = delivery.store_contacts

    async def freeze_then_store(states: Any, revisions: Any) -> bool:
        delivery.store_contacts = real
        freeze(pid)
        return await real(states, revisions)

    delivery.store_contacts = freeze_then_store


def counters(hub: HubThread) -> dict[str, int]:
    return hub.status()["counters"]


@pytest.mark.parametrize("answer", [True, False], ids=["pops-lost", "state-answer-lost"])
def test_the_resend_to_another_hub_writes_the_lost_pop(nats1: NatsCluster, answer: bool) -> None:
    proxy = CutProxy(nats1.nodes[0].port)
    cut = HubThread(backend="nats", nats_servers=proxy.url, nats_timeout=1)
    other = HubThread(backend="nats", nats_servers=nats1.servers)
    try:
        listener, got = listen(other, "6")
        lose_after_state(cut, proxy, answer)
        with pytest.raises(JournalUnavailable):
            cut.call(cut.hub.apply_contacts(dict(ROUTED)))  # type: ignore[union-attr]
        time.sleep(0.5)
        assert got == []  # stored state, no pop: lost until the resend
        # the source resends to another hub (the balancer took the cut one out)
        assert other.call(other.hub.apply_contacts(dict(ROUTED))) == {  # type: ignore[union-attr]
            "applied": 1,
            "pops": [],
        }
        assert wait_for(lambda: got == [("ev-routed", "+33 1 23")])
        assert counters(other)["duplicate_events"] == 1
        assert counters(other)["contact_writes_replayed"] == 1
        # and again: JetStream keeps one copy; the agent has one pop
        other.call(other.hub.apply_contacts(dict(ROUTED)))  # type: ignore[union-attr]
        assert wait_for(lambda: counters(other)["acked"] == 1)
        time.sleep(0.5)
        assert got == [("ev-routed", "+33 1 23")]
        assert counters(other)["contact_writes_replayed"] == 2
        listener.shutdown()
    finally:
        other.close()
        cut.close()
        proxy.close()


def test_the_resend_to_the_same_hub_writes_updates_and_withdrawals_again(
    nats1: NatsCluster,
) -> None:
    """An `answered` whose writes were lost: the resend writes its take-back update again, so
    the pop still pending on the other agent's desktop is withdrawn."""
    proxy = CutProxy(nats1.nodes[0].port)
    hub = HubThread(backend="nats", nats_servers=proxy.url, nats_timeout=1)
    try:
        first = hub.call(hub.hub.apply_contacts(dict(ROUTED)))  # type: ignore[union-attr]
        assert first["pops"] == ["ev-routed"]
        answered = {"id": "ev-answered", "contact_id": "c-1", "event": "answered", "resource": "7"}
        lose_after_state(hub, proxy, answer=True)
        with pytest.raises(JournalUnavailable):
            hub.call(hub.hub.apply_contacts(dict(answered)))  # type: ignore[union-attr]
        proxy.heal()
        assert hub.hub is not None
        assert wait_for(lambda: hub.hub.delivery.nc.is_connected, timeout=15)
        assert hub.status()["pending"] == 0  # nobody listens: the pop waits in the stream
        before = counters(hub)
        assert hub.call(hub.hub.apply_contacts(dict(answered))) == {"applied": 1, "pops": []}
        after = counters(hub)
        assert after["contact_writes_replayed"] - before.get("contact_writes_replayed", 0) == 1
        assert after["changes_accepted"] - before.get("changes_accepted", 0) == 1
        listener, got = listen(hub, "6")
        time.sleep(0.5)
        assert got == []  # taken back: answered by 7 before anyone listened on 6
        listener.shutdown()
    finally:
        hub.close()
        proxy.close()


@pytest.mark.parametrize(("after", "replayed"), [(2.7, 1), (3.7, 0)])
def test_writes_are_replayed_only_within_eight_tenths_of_the_duplicate_window(
    nats1: NatsCluster, after: float, replayed: int
) -> None:
    """Past 0.8 × dedupe_window (4 s here: 3.2 s) the first copy may have left JetStream's
    duplicate window: a second copy would pop twice, so the resend writes nothing (and the lost
    pop stays lost)."""
    proxy = CutProxy(nats1.nodes[0].port)
    cut = HubThread(backend="nats", nats_servers=proxy.url, nats_timeout=1, dedupe_window=4)
    other = HubThread(backend="nats", nats_servers=nats1.servers, dedupe_window=4)
    try:
        lose_after_state(cut, proxy, answer=True)
        applied = time.time()
        with pytest.raises(JournalUnavailable):
            cut.call(cut.hub.apply_contacts(dict(ROUTED)))  # type: ignore[union-attr]
        assert time.time() - applied < after
        time.sleep(applied + after - time.time())
        answer = other.call(other.hub.apply_contacts(dict(ROUTED)))  # type: ignore[union-attr]
        assert answer == {"applied": 1, "pops": []}  # a duplicate either way
        assert counters(other)["contact_writes_replayed"] == replayed
        assert counters(other).get("pops_accepted", 0) == replayed  # absent: 0
    finally:
        other.close()
        cut.close()
        proxy.close()


def test_a_state_stored_late_has_its_writes_replayed_after_the_hubs_window(
    nats1: NatsCluster,
) -> None:
    """The state write is sent, unanswered (the node frozen), and stored only when the node
    comes back, after 0.8 x dedupe_window (2.4 s here) of the hub's clock: its writes are timed
    from that store, JetStream's clock, so the resend still writes the pop (it was lost)."""
    hub = HubThread(backend="nats", nats_servers=nats1.servers, nats_timeout=2, dedupe_window=3)
    node = nats1.nodes[0].proc
    assert node is not None
    try:
        listener, got = listen(hub, "6")
        freeze_at_next_state_write(hub, node.pid)
        applied = time.time()
        with pytest.raises(JournalUnavailable) as refused:
            hub.call(hub.hub.apply_contacts(dict(ROUTED)))  # type: ignore[union-attr]
        assert refused.value.message == (
            "JetStream did not answer in 2 s: the events may still be applied; resend them "
            "with the same ids (applied once)"
        )
        time.sleep(max(0.0, applied + 2.8 - time.time()))
        os.kill(node.pid, signal.SIGCONT)  # the state write is stored now
        assert wait_for(lambda: counters(hub)["pending"] == 0)
        again = hub.call(hub.hub.apply_contacts(dict(ROUTED)))  # type: ignore[union-attr]
        assert again == {"applied": 1, "pops": []}
        assert wait_for(lambda: got == [("ev-routed", "+33 1 23")])
        assert counters(hub)["contact_writes_replayed"] == 1
        listener.shutdown()
    finally:
        os.kill(node.pid, signal.SIGCONT)
        hub.close()


def test_an_unanswered_state_write_stored_later_gets_its_pop_without_a_resend(
    nats1: NatsCluster,
) -> None:
    """The state write is sent and unanswered (the node frozen: as a quorum lost), the source
    told 503 and, here, never resending. The hub reads the state again until it can: stored,
    with no later event, so it writes the pop itself."""
    # frozen for less than the hub's pings take to drop the link (about 2 x nats_timeout):
    # dropped, the write would never be stored
    hub = HubThread(backend="nats", nats_servers=nats1.servers, nats_timeout=2)
    node = nats1.nodes[0].proc
    assert node is not None
    try:
        listener, got = listen(hub, "6")
        freeze_at_next_state_write(hub, node.pid)
        with pytest.raises(JournalUnavailable):
            hub.call(hub.hub.apply_contacts(dict(ROUTED)))  # type: ignore[union-attr]
        time.sleep(0.5)
        assert got == []
        os.kill(node.pid, signal.SIGCONT)  # the state write is stored now
        assert wait_for(lambda: got == [("ev-routed", "+33 1 23")], timeout=20)
        assert counters(hub)["contact_writes_settled"] == 1
        assert counters(hub).get("contact_writes_replayed", 0) == 0
        listener.shutdown()
    finally:
        os.kill(node.pid, signal.SIGCONT)
        hub.close()


def test_a_resend_of_an_earlier_event_of_a_call_over_writes_no_pop(nats1: NatsCluster) -> None:
    """The pop of `routed` was lost, then the call ended (on another hub), then `routed` is
    resent: writing its pop now would leave it on the agent's screen for a call that is over."""
    proxy = CutProxy(nats1.nodes[0].port)
    cut = HubThread(backend="nats", nats_servers=proxy.url, nats_timeout=1)
    other = HubThread(backend="nats", nats_servers=nats1.servers)
    try:
        listener, got = listen(other, "6")
        lose_after_state(cut, proxy, answer=True)
        with pytest.raises(JournalUnavailable):
            cut.call(cut.hub.apply_contacts(dict(ROUTED)))  # type: ignore[union-attr]
        ended = {"id": "ev-ended", "contact_id": "c-1", "event": "ended"}
        assert other.call(other.hub.apply_contacts(ended)) == {"applied": 1, "pops": []}  # type: ignore[union-attr]
        assert other.call(other.hub.apply_contacts(dict(ROUTED))) == {  # type: ignore[union-attr]
            "applied": 1,
            "pops": [],
        }
        time.sleep(0.5)
        assert got == []
        assert counters(other)["contact_writes_replayed"] == 0
        listener.shutdown()
    finally:
        other.close()
        cut.close()
        proxy.close()


def test_spop_send_to_a_list_moves_on_from_a_hub_cut_off_from_nats(nats1: NatsCluster) -> None:
    """`spop send --server a,b`: hub a answers 503 `journal_unavailable` (its link to NATS is
    down), so the pop goes to b, once. A refusal of the pop itself is not retried elsewhere."""
    from click.testing import CliRunner

    from spop_cli import client
    from spop_cli.cli import cli

    proxy = CutProxy(nats1.nodes[0].port)
    cut = HubThread(backend="nats", nats_servers=proxy.url, nats_timeout=1)
    other = HubThread(backend="nats", nats_servers=nats1.servers)
    try:
        listener, got = listen(other, "6")
        proxy.cut()
        assert cut.hub is not None
        assert wait_for(lambda: not cut.hub.delivery.nc.is_connected)  # type: ignore[union-attr]
        servers = f"{cut.address},{other.address}"
        runner = CliRunner()
        sent = runner.invoke(
            cli, ["send", "telephone", "6", "--source", "+33 9", "--server", servers]
        )
        assert sent.exit_code == 0, sent.output
        pop_id = sent.output.strip()
        assert len(pop_id) == 32  # given by spop send, so a resend elsewhere is a duplicate
        assert wait_for(lambda: got == [(pop_id, "+33 9")])
        assert counters(cut)["journal_refused"] == 1  # its 503, counted there
        event = {k: v for k, v in ROUTED.items() if k != "id"}
        answer = asyncio.run(client.send_contacts(servers, [event]))
        assert answer["applied"] == 1
        assert len(answer["pops"][0]) == 32  # the event's id, given by the sender
        assert wait_for(lambda: got == [(pop_id, "+33 9"), (answer["pops"][0], "+33 1 23")])
        only_cut = runner.invoke(cli, ["send", "telephone", "6", "--server", cut.address])
        assert (only_cut.exit_code, only_cut.output) == (  # the last hub's answer is final
            16,
            "spop: error: the hub cannot take it now (journal_unavailable): SCREENPOP_Framework_Error: "
            "this hub is not connected to NATS (reconnecting): nothing was accepted; retry later, "
            "or on another hub\n",
        )
        time.sleep(0.5)
        assert got == [(pop_id, "+33 9"), (answer["pops"][0], "+33 1 23")]
        listener.shutdown()
    finally:
        other.close()
        cut.close()
        proxy.close()
