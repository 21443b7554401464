"""Spreading desktops over several hubs (`spread`): each desktop (host and user) tries the hubs
in its own order, so a site's desktops given the same list share the hubs, and a lost hub's
desktops share the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import HubThread, wait_for
from spop_cli import ListenerStatus, ScreenPopTelephoneListener
from spop_cli.address import desk_identity, parse_addresses, spread_order
from spop_cli.config import load_settings, validate

S = ListenerStatus
HUBS = ["6000@hub-a", "6000@hub-b", "6000@hub-c"]
DESKS = [f"pc-{i:04d}/agent{i % 7}" for i in range(3000)]


def firsts(hubs: list[str], desks: list[str]) -> dict[str, str]:
    return {desk: hubs[spread_order(hubs, desk)[0]] for desk in desks}


def test_desktops_are_spread_evenly_over_the_hubs() -> None:
    counts = Counter(firsts(HUBS, DESKS).values())
    assert sorted(counts) == sorted(HUBS)
    assert all(900 <= n <= 1100 for n in counts.values()), counts  # 1,000 each, ±10 %


def test_a_lost_hubs_desktops_share_the_others_and_no_other_desktop_moves() -> None:
    before = firsts(HUBS, DESKS)
    after = firsts(HUBS[1:], DESKS)  # hub-a gone
    moved = [desk for desk in DESKS if before[desk] == "6000@hub-a"]
    for desk in DESKS:
        order = [HUBS[i] for i in spread_order(HUBS, desk)]
        if desk in moved:
            assert after[desk] == order[1]  # its second choice
        else:
            assert after[desk] == before[desk]
    counts = Counter(after[desk] for desk in moved)
    half = len(moved) / 2
    assert all(0.85 * half <= n <= 1.15 * half for n in counts.values()), counts


def test_the_order_is_the_desktops_not_the_lists() -> None:
    for desk in DESKS[:50]:
        ranked = [HUBS[i] for i in spread_order(HUBS, desk)]
        backwards = HUBS[::-1]
        assert [backwards[i] for i in spread_order(backwards, desk)] == ranked
    assert spread_order(parse_addresses(",".join(HUBS)), "pc/x") == spread_order(HUBS, "pc/x")


def test_the_identity_is_host_and_user(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setenv("LOGNAME", "agent-42")
    assert desk_identity() == f"{socket.gethostname()}/agent-42"


def user_first_on(addresses: list[str], index: int) -> str:
    """A user name whose desktop (this host) ranks hub `index` first."""
    import socket

    host = socket.gethostname()
    for n in range(1000):
        name = f"agent-{n}"
        if spread_order(addresses, f"{host}/{name}")[0] == index:
            return name
    raise AssertionError("no such user")


@pytest.fixture
def three_hubs():
    hubs = [HubThread(), HubThread(), HubThread()]
    yield hubs
    for hub in hubs:
        hub.close()


@pytest.mark.parametrize("first", [0, 1, 2])
def test_a_spread_listener_starts_at_its_own_hub_and_fails_over_to_its_second(
    three_hubs: list[HubThread], first: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    addresses = [hub.address for hub in three_hubs]
    monkeypatch.setenv("LOGNAME", user_first_on(addresses, first))
    order = spread_order(addresses, desk_identity())
    assert order[0] == first
    listener = ScreenPopTelephoneListener(reconnecting_interval=0.3, spread=True)
    got: list[str] = []
    listener.on_screen_pop(lambda event: got.append(event.id))
    try:
        listener.initialize(",".join(addresses))
        listener.start_listening("13579")
        assert [hub.status()["registrations"] for hub in three_hubs] == [
            int(i == first) for i in range(3)
        ]
        three_hubs[first].stop()
        second = three_hubs[order[1]]
        assert wait_for(
            lambda: listener.status is S.Status_Up and second.status()["registrations"] == 1
        )
        (pop_id,) = second.publish({"media": "telephone", "resource": "13579"})
        assert wait_for(lambda: got == [pop_id])
        third = three_hubs[order[2]]
        assert third.status()["registrations"] == 0
    finally:
        listener.shutdown()


def test_a_spread_listener_goes_back_to_its_first_hub_at_its_next_reconnect(
    three_hubs: list[HubThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its first hub lost, then back: the listener stays on its second while that serves, and
    when it loses that one it goes back to its first, not on to its third (a rolling restart
    leaves every desktop where it began)."""
    addresses = [hub.address for hub in three_hubs]
    monkeypatch.setenv("LOGNAME", user_first_on(addresses, 0))
    first, second, third = (three_hubs[i] for i in spread_order(addresses, desk_identity()))
    listener = ScreenPopTelephoneListener(reconnecting_interval=0.3, spread=True)
    try:
        listener.initialize(",".join(addresses))
        listener.start_listening("13579")
        first.stop()
        assert wait_for(lambda: second.status()["registrations"] == 1)
        first.start()  # the same ports
        second.stop()
        assert wait_for(
            lambda: listener.status is S.Status_Up and first.status()["registrations"] == 1
        )
        assert third.status()["registrations"] == 0
    finally:
        listener.shutdown()


def test_a_hub_spelt_differently_ranks_alike() -> None:
    for desk in DESKS[:200]:
        assert spread_order(["hub-a:6000", "HUB-B:6000", "6000@hub-c"], desk) == spread_order(
            HUBS, desk
        )


def test_without_spread_every_desktop_starts_at_the_first_hub(
    three_hubs: list[HubThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    addresses = [hub.address for hub in three_hubs]
    monkeypatch.setenv("LOGNAME", user_first_on(addresses, 2))
    listener = ScreenPopTelephoneListener(reconnecting_interval=0.3)
    try:
        listener.initialize(",".join(addresses))
        listener.start_listening("13579")
        assert [hub.status()["registrations"] for hub in three_hubs] == [1, 0, 0]
    finally:
        listener.shutdown()


@pytest.mark.parametrize(
    "option, in_file, on",
    [("--spread", "", 1), ("--no-spread", "spread = true\n", 0)],
)
def test_spop_listen_spread_pops_from_its_own_hub(
    three_hubs: list[HubThread], tmp_path: Path, option: str, in_file: str, on: int
) -> None:
    """`spop listen --spread`: a pop waiting on this desktop's first hub (not the list's first)
    reaches it; `--no-spread` over a file's `spread = true`: the list's first hub's."""
    addresses = [hub.address for hub in three_hubs]
    user = user_first_on(addresses, 1)
    (pop_id,) = three_hubs[on].publish({"media": "telephone", "resource": "2468"})
    config = tmp_path / "spop.toml"
    config.write_text(f'[server]\naddress = "{",".join(addresses)}"\n{in_file}')
    env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag"), "LOGNAME": user}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    for name in ("SPOP_SERVER", "SPOP_TOKEN"):
        env.pop(name, None)
    env["SPOP_CONFIG"] = str(config)
    done = subprocess.run(
        [sys.executable, "-m", "spop_cli", "listen", "telephone", "2468", "--json", "--once"]
        + [option, "--timeout", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["id"] == pop_id
    acked = [hub.status()["counters"].get("acked", 0) for hub in three_hubs]
    assert acked == [int(i == on) for i in range(3)]


def test_spread_in_the_configuration(tmp_path: Path) -> None:
    config = tmp_path / "spop.toml"
    config.write_text('[server]\naddress = "6000@a,6000@b"\n')
    assert load_settings(config, environ={}).server.spread is False
    config.write_text('[server]\naddress = "6000@a,6000@b"\nspread = true\n')
    assert load_settings(config, environ={}).server.spread is True
    overridden = load_settings(config, {"server": {"spread": False}}, environ={})
    assert overridden.server.spread is False  # `spop listen --no-spread` over the file
    problems = validate({"server": {"spread": "yes"}})
    assert [(p.path, p.message) for p in problems] == [("server.spread", "must be true or false")]
