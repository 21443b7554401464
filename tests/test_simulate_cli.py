"""`spop simulate` against a real `spop serve` process, with a real listener in the test process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import wait_for
from guide_pops import EMPTY_POP
from hubproc import HubProcess
from spop_cli import ScreenPopCallbackListener, ScreenPopTelephoneListener
from spop_cli.cli import EXIT_CONFIG, EXIT_REJECTED, cli
from spop_cli.scenario import builtin_names, load_scenario

GUIDE = ["routed-call", "consultation", "requeue"]
CALLBACK_SCENARIO = """\
description = "A callback from the web site, routed to user agent7 after 42 s."

[[events]]
after = 0
contact_id = "cb"
event = "queued"
media = "callback"
destination = "0612345678"
queue_name = "Rappels"
contact_data = { dossier = "A-17" }

[[events]]
after = 42
contact_id = "cb"
event = "routed"
resource = "agent7"
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """`spop serve --port 0 --http-port 0 --no-journal --ready-file …` as its own process."""
    hub = HubProcess(tmp_path_factory.mktemp("serve"), journal=False)
    hub.start()
    try:
        ready = json.loads(hub.ready_file.read_text(encoding="utf-8"))
        assert ready == {"port": hub.port, "http_port": hub.http_port, "pid": hub.pid}
        yield hub
    finally:
        hub.stop()  # SIGTERM, as a service manager would


class Agent:
    """A blocking listener in this process; keeps the pops of the contacts it is told about."""

    def __init__(self, cls: type, served: HubProcess, resource: str) -> None:
        self.pops: list[Any] = []
        self._lock = threading.Lock()
        self.listener = cls(reconnecting_interval=0.3)
        self.listener.on_screen_pop(self._got)
        self.listener.initialize(served.address)
        self.listener.start_listening(resource)

    def _got(self, pop: Any) -> None:
        with self._lock:
            self.pops.append(pop)

    def of(self, ids: list[str]) -> list[Any]:
        """The pops with these ids once all have arrived, in the order of the ids."""
        assert wait_for(lambda: set(ids) <= {pop.id for pop in self.pops})
        with self._lock:
            received = {pop.id: pop for pop in self.pops}
        return [received[pop_id] for pop_id in ids]


@pytest.fixture
def agents(served: HubProcess) -> Iterator[dict[str, Agent]]:
    """Telephone listeners on every extension the guide's scenarios pop to, and one callback user."""
    desks = {
        resource: Agent(ScreenPopTelephoneListener, served, resource)
        for resource in ("13579", "54321", "1111")
    }
    desks["agent7"] = Agent(ScreenPopCallbackListener, served, "agent7")
    yield desks
    for desk in desks.values():
        desk.listener.shutdown()


def simulate(*args: str) -> Any:
    return CliRunner().invoke(cli, ["simulate", *args])


def wire(pop: Any) -> dict[str, Any]:
    fields = pop.to_dict()
    del fields["id"], fields["created_at"]
    return fields


@pytest.mark.parametrize("name", GUIDE)
def test_guide_scenario_by_name(served: HubProcess, agents: dict[str, Agent], name: str) -> None:
    prefix = f"t{uuid.uuid4().hex[:6]}-"

    result = simulate(name, "--server", served.address, "--contact-prefix", prefix, "--json")

    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    scenario = load_scenario(name)
    assert answer["applied"] == len(scenario.events)
    assert len(answer["pops"]) == len(scenario.expect)
    for pop_id, entry in zip(answer["pops"], scenario.expect, strict=True):
        [pop] = agents[entry["resource"]].of([pop_id])
        want = {**EMPTY_POP, **entry, "contact_id": prefix + entry["contact_id"]}
        assert wire(pop) == want


def test_simulate_as_a_process(served: HubProcess, agents: dict[str, Agent]) -> None:
    command = [sys.executable, "-m", "spop_cli", "simulate", "consultation", "--json", "--server"]
    done = subprocess.run([*command, served.address], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["applied"] == 4 and len(answer["pops"]) == 2
    [routed] = agents["13579"].of(answer["pops"][:1])
    [consulted] = agents["54321"].of(answer["pops"][1:])
    assert (routed.wait_time, routed.from_) == (10, "")
    assert (consulted.source, consulted.destination) == ("12345", "2468")
    assert (consulted.from_, consulted.wait_time) == ("13579", 15)
    # without --contact-prefix every run gets a fresh one
    assert consulted.contact_id.endswith("-call-consultation")
    assert consulted.contact_id != "call-consultation"


def test_scenario_file_from_a_path(
    served: HubProcess, agents: dict[str, Agent], tmp_path: Path
) -> None:
    path = tmp_path / "web-callback.toml"
    path.write_text(CALLBACK_SCENARIO, encoding="utf-8")

    result = simulate(str(path), "--server", served.address, "--json")

    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["applied"] == 2
    [pop] = agents["agent7"].of(answer["pops"])
    assert type(pop).__name__ == "ScreenPopCallbackEvent"
    assert (pop.destination, pop.queue_name, pop.wait_time) == ("0612345678", "Rappels", 42)
    assert pop.contact_data.to_dict() == {"dossier": "A-17"}
    assert pop.contact_id.endswith("-cb")


def test_plain_output_names_the_scenario(served: HubProcess, agents: dict[str, Agent]) -> None:
    result = simulate("requeue", "--server", served.address)
    assert result.exit_code == 0, result.output
    assert result.stdout == "requeue: 5 events applied, 2 pops\n"


def test_realtime_lets_the_hub_stamp_the_times(
    served: HubProcess, agents: dict[str, Agent], tmp_path: Path
) -> None:
    path = tmp_path / "quick.toml"
    path.write_text(CALLBACK_SCENARIO.replace("after = 42", "after = 0.01"), encoding="utf-8")

    result = simulate(str(path), "--server", served.address, "--realtime", "--json")

    assert result.exit_code == 0, result.output
    [pop] = agents["agent7"].of(json.loads(result.stdout)["pops"])
    assert pop.wait_time == 0 and pop.queue_name == "Rappels"


BAD_FILES = [
    ('description = "x"\nevnts = []\n', "evnts"),
    ('[[events]]\nafter = 0\ncontact_id = "c"\n', "events[0].event"),
    ('[[events]]\nafter = -1\ncontact_id = "c"\nevent = "queued"\n', "events[0].after"),
    ('[[events]]\ncontact_id = "c"\nevent = "queued"\nsource = 12345\n', "events[0].source"),
    (
        '[[events]]\ncontact_id = "c"\nevent = "queued"\n[[expect]]\nqueue = "x"\n',
        "expect[0].queue",
    ),
    ("[[events]\n", "not valid TOML"),
    ('description = "nothing to play"\n', "events"),
]


@pytest.mark.parametrize("content, key", BAD_FILES, ids=[key for _, key in BAD_FILES])
def test_bad_scenario_file_names_the_file_and_key(tmp_path: Path, content: str, key: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(content, encoding="utf-8")

    # nothing is sent: the server is never reached
    result = simulate(str(path), "--server", "1@127.0.0.1")

    assert result.exit_code == EXIT_CONFIG
    assert str(path) in result.stderr and key in result.stderr


def test_unknown_scenario_is_a_usage_error_pointing_to_list() -> None:
    result = simulate("no-such-scenario", "--server", "1@127.0.0.1")
    assert result.exit_code == 2
    assert "'no-such-scenario'" in result.stderr
    assert "spop simulate --list" in result.stderr


def test_list_names_every_builtin_with_its_description() -> None:
    result = simulate("--list")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == builtin_names()
    assert len(listed) == 18
    assert all(len(line.split(maxsplit=1)) == 2 for line in result.stdout.splitlines())


def test_a_scenario_file_that_is_not_valid_is_exit_12(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("events = 3\n")
    result = simulate(str(path), "--server", "1@127.0.0.1")
    assert result.exit_code == EXIT_CONFIG
    assert str(path) in result.stderr


def test_event_the_hub_refuses(served: HubProcess, tmp_path: Path) -> None:
    path = tmp_path / "orphan.toml"
    path.write_text('[[events]]\ncontact_id = "c"\nevent = "answered"\nresource = "1"\n')

    result = simulate(str(path), "--server", served.address)

    assert result.exit_code == EXIT_REJECTED
    assert "SCREENPOP_Framework_Error" in result.stderr and "no contact" in result.stderr


def test_unreachable_hub() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    result = simulate("routed-call", "--server", f"{closed_port}@127.0.0.1", "--timeout", "5")
    assert result.exit_code == 3
    assert "SCREENPOP_Cannot_Find_HiPath_ProCenter" in result.stderr
