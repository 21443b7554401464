"""The spine's commands for real: `spop serve` as a process, `spop send`, `spop demo`, `--version`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from spop_cli import ScreenPopTelephoneListener, __version__
from spop_cli.cli import EXIT_CODES, EXIT_REJECTED, cli

SPOP = [sys.executable, "-m", "spop_cli"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One `spop serve` for the module's tests: none changes what another sees of it."""
    tmp_path = tmp_path_factory.mktemp("served")
    ready = tmp_path / "ready.json"
    env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag")}
    process = subprocess.Popen(
        [
            *SPOP,
            "serve",
            "--port",
            "0",
            "--http-port",
            "0",
            "--journal",
            str(tmp_path / "j.sqlite3"),
            "--ready-file",
            str(ready),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, "hub did not start"
        time.sleep(0.005)
    info = json.loads(ready.read_text())
    info["address"] = f"{info['port']}@127.0.0.1"
    info["process"] = process
    info["diag"] = tmp_path / "diag"
    yield info
    process.send_signal(signal.SIGTERM)
    process.wait(10)


def test_version() -> None:
    result = subprocess.run([*SPOP, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"spop, version {__version__}"


def test_send_reaches_a_listener_with_every_option(served: dict) -> None:
    listener = ScreenPopTelephoneListener()
    got = []
    arrived = threading.Event()
    listener.on_screen_pop(lambda e: (got.append(e), arrived.set()))
    listener.initialize(served["address"])
    listener.start_listening("54321")
    result = subprocess.run(
        [
            *SPOP,
            "send",
            "telephone",
            "54321",
            "--server",
            served["address"],
            "--source",
            "12345",
            "--destination",
            "2468",
            "--queue",
            "File d'attente des ventes",
            "--description",
            "Ventes",
            "--from",
            "13579",
            "--redirect",
            "777",
            "--wait",
            "15",
            "--data",
            "code1=chaîne1",
            "--data",
            "url=a=b&c",
            "--id",
            "pop-1",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "pop-1"
    assert arrived.wait(5)
    event = got[0]
    assert (event.source, event.destination, event.queue_name, event.contact_description) == (
        "12345",
        "2468",
        "File d'attente des ventes",
        "Ventes",
    )
    assert (event.from_, event.redirect, event.wait_time) == ("13579", "777", 15)
    assert event.contact_data.to_dict() == {"code1": "chaîne1", "url": "a=b&c"}
    listener.shutdown()


def test_send_without_a_hub_names_the_code() -> None:
    result = CliRunner().invoke(
        cli, ["send", "telephone", "1", "--server", "1@127.0.0.1", "--timeout", "2"]
    )
    assert result.exit_code == EXIT_CODES["SCREENPOP_Cannot_Find_HiPath_ProCenter"]
    assert "SCREENPOP_Cannot_Find_HiPath_ProCenter" in result.output


def test_send_bad_input_is_rejected_by_the_hub(served: dict) -> None:
    result = CliRunner().invoke(cli, ["send", "telephone", " ", "--server", served["address"]])
    assert result.exit_code == EXIT_REJECTED
    assert "resource" in result.output


def test_send_bad_data_option() -> None:
    result = CliRunner().invoke(cli, ["send", "telephone", "1", "--data", "novalue"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_send_unknown_media() -> None:
    result = CliRunner().invoke(cli, ["send", "fax", "1"])
    assert result.exit_code == 2 and "telephone" in result.output


def test_serve_refuses_a_busy_port(served: dict) -> None:
    result = subprocess.run(
        [*SPOP, "serve", "--port", str(served["port"]), "--http-port", "-1", "--no-journal"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1 and "cannot listen" in result.stderr


def test_serve_warns_when_exposed_without_token(tmp_path: Path) -> None:
    from spop_cli.serve import build_hub_config, exposure_warnings

    config = build_hub_config(None, host="0.0.0.0", no_journal=True)
    warnings = exposure_warnings(config)
    assert any("without a token" in w for w in warnings)
    assert exposure_warnings(build_hub_config(None, no_journal=True)) == []


def test_demo_runs_and_exits_by_itself(tmp_path: Path) -> None:
    temp, diag = tmp_path / "tmp", tmp_path / "diag"
    temp.mkdir()
    result = subprocess.run(
        [*SPOP, "demo", "--delay", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SPOP_DIAG_DIR": str(diag), "TMPDIR": str(temp)},
    )
    assert result.returncode == 0, result.stderr
    assert "9/9 pops delivered" in result.stdout
    assert "54321" in result.stdout and "1111" in result.stdout
    assert "[vide]" not in result.stdout and "–" in result.stdout  # an empty field: a dim dash
    assert list(temp.iterdir()) == []  # no temporary folder left behind
    assert not diag.exists()  # nothing written into the user's own diagnostics


def test_serve_options_merge_file_then_environment_then_command_line(
    tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from spop_cli.serve import ServeError, build_hub_config

    config = tmp_path / "spop.toml"
    config.write_text('[hub]\nport = 7001\nhttp_port = 7081\npop_ttl = 30\ntoken = "from-file"\n')
    monkeypatch.setenv("SPOP_TOKEN", "from-env")
    merged = build_hub_config(str(config), port=7002, no_journal=True)
    assert (merged.port, merged.http_port, merged.pop_ttl) == (7002, 7081, 30)
    assert merged.token == "from-env" and merged.journal is None
    config.write_text('[hub]\nport = "many"\n')
    with pytest.raises(ServeError) as info:
        build_hub_config(str(config))
    assert "hub.port" in str(info.value)


def test_serve_warns_when_only_publishing_is_protected() -> None:
    from spop_cli.serve import build_hub_config, exposure_warnings

    config = build_hub_config(None, host="0.0.0.0", source_token="s3cret", no_journal=True)
    assert any("only a source token" in w for w in exposure_warnings(config))
    config = build_hub_config(None, host="0.0.0.0", token="t", source_token="s", no_journal=True)
    assert not any("token" in w for w in exposure_warnings(config))


# -- serve: a bad journal, certificate or diagnostics folder is a message, not a traceback ------
def serve_fails(
    tmp_path: Path, *args: str, diag: Path | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPOP_DIAG_DIR": str(diag or tmp_path / "diag")}
    return subprocess.run(
        [*SPOP, "serve", "--port", "0", "--http-port", "-1", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_serve_with_a_corrupt_journal_is_exit_12(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    journal.write_bytes(os.urandom(8192))
    result = serve_fails(tmp_path, "--journal", str(journal))
    assert result.returncode == 12, result.stderr
    assert "Traceback" not in result.stderr
    assert f"spop: error: hub.journal: cannot open the journal {journal}: " in result.stderr


def test_serve_with_a_journal_folder_that_cannot_be_made_is_exit_12(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    journal = tmp_path / "afile" / "journal.sqlite3"
    result = serve_fails(tmp_path, "--journal", str(journal))
    assert result.returncode == 12, result.stderr
    assert "Traceback" not in result.stderr
    assert f"hub.journal: cannot open the journal {journal}" in result.stderr


def test_serve_with_a_bad_certificate_is_exit_12(tmp_path: Path) -> None:
    pem = tmp_path / "bad.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    result = serve_fails(tmp_path, "--no-journal", "--tls-cert", str(pem), "--tls-key", str(pem))
    assert result.returncode == 12, result.stderr
    assert "Traceback" not in result.stderr and "cannot listen" not in result.stderr
    assert "spop: error: hub.tls_cert/hub.tls_key: cannot load the certificate" in result.stderr
    assert str(pem) in result.stderr


def test_serve_with_a_diagnostics_folder_that_is_a_file_is_exit_6(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    result = serve_fails(tmp_path, "--no-journal", diag=afile)
    assert result.returncode == EXIT_CODES["SCREENPOP_Cannot_Create_Diags"], result.stderr
    assert "Traceback" not in result.stderr
    assert f"SCREENPOP_Cannot_Create_Diags: cannot create diagnostics in {afile}" in result.stderr
