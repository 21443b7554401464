"""The sources framework: the register_sources hook, `spop source`, sources inside `spop serve`,
and the remote sink that survives a hub restart. A third-party plugin file is the source here."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubproc import HubProcess, http_post
from spop_cli.cli import cli
from spop_cli.sources import RemoteSink

DATA = Path(__file__).parent / "data"


def write_config(path: Path, address: str = "6000@127.0.0.1", **table: object) -> Path:
    lines = [
        f'[server]\naddress = "{address}"\n',
        f'[plugins]\ndirs = ["{DATA}"]\n',
        "[sources.front]",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in {"type": "ticker", **table}.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def listen(address: str, resource: str, count: int, tmp_path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag-listen")}
    cmd = [sys.executable, "-m", "spop_cli", "listen", "telephone", resource, "--server", address]
    cmd += ["--json", "--count", str(count), "--timeout", "30"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def descriptions(proc: subprocess.Popen[str]) -> list[str]:
    out, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err
    return [json.loads(line)["contact_description"] for line in out.splitlines()]


def test_list_shows_a_plugin_source_and_the_configured_ones(tmp_path: Path) -> None:
    config = write_config(tmp_path / "spop.toml", resource="777")
    result = CliRunner().invoke(cli, ["source", "--list", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "ticker       pops a call at start and one per webhook POST" in result.output
    assert f"({DATA / 'ticker_source.py'}, ticker_source)" in result.output
    assert "[sources.front] type ticker" in result.output


def test_no_name_and_no_list_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["source", "--config", str(write_config(tmp_path / "c.toml"))])
    assert result.exit_code == 2
    assert "name a source to run, or use --list" in result.output


def test_config_check_names_the_source_key_at_fault(tmp_path: Path) -> None:
    config = write_config(tmp_path / "spop.toml", colour="blue")
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(config)])
    assert result.exit_code == 12, result.output
    assert "sources.front.colour" in result.output
    assert "unknown key" in result.output


def test_config_check_accepts_a_good_source(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["config", "check", "--config", str(write_config(tmp_path / "c.toml"))]
    )
    assert result.exit_code == 0, result.output


def test_unknown_source_type_is_refused_by_serve(tmp_path: Path) -> None:
    config = write_config(tmp_path / "spop.toml", type="nosuch")
    result = CliRunner().invoke(cli, ["serve", "--config", str(config), "--no-journal"])
    assert result.exit_code == 12
    assert "sources.front.type: unknown source type 'nosuch'" in result.output


def test_config_show_hides_source_secrets(tmp_path: Path) -> None:
    config = tmp_path / "spop.toml"
    config.write_text(
        '[sources.pbx]\ntype = "asterisk"\nsecret = "s3cret"\nauth_token = "t0k"\nhost = "pbx"\n'
    )
    result = CliRunner().invoke(cli, ["config", "show", "--config", str(config)])
    assert "s3cret" not in result.output and "t0k" not in result.output
    assert 'secret = "********"' in result.output and 'host = "pbx"' in result.output


def test_check_reports_the_link(tmp_path: Path) -> None:
    good = CliRunner().invoke(
        cli, ["source", "front", "--check", "--config", str(write_config(tmp_path / "a.toml"))]
    )
    assert good.exit_code == 0, good.output
    assert "ticker would pop 13579" in good.output
    bad = write_config(tmp_path / "b.toml", resource="fail")
    assert (
        CliRunner().invoke(cli, ["source", "front", "--check", "--config", str(bad)]).exit_code == 3
    )


def test_standalone_source_pops_at_start_and_on_its_webhook(tmp_path: Path) -> None:
    with HubProcess(tmp_path / "hub") as hub:
        listener = listen(hub.address, "777", 2, tmp_path)
        config = write_config(
            tmp_path / "spop.toml", hub.address, resource="777", listen="127.0.0.1:0"
        )
        env = {**os.environ, "SPOP_DIAG_DIR": str(tmp_path / "diag-source")}
        source = subprocess.Popen(
            [sys.executable, "-m", "spop_cli", "source", "front", "--config", str(config)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert source.stderr is not None
            line = source.stderr.readline()
            while line and not line.startswith("spop source front:"):  # the source's log lines
                line = source.stderr.readline()
            assert line.startswith(
                f"spop source front: sending to {hub.address}, webhooks on port "
            ), line
            port = int(line.rsplit(" ", 1)[1])
            status, answer = http_post(
                f"http://127.0.0.1:{port}/v1/sources/front/hook",
                {"contact_id": "w-1", "resource": "777"},
            )
            assert (status, answer["applied"]) == (200, 2)
            assert sorted(descriptions(listener)) == ["at start", "webhook"]
        finally:
            source.terminate()
            source.wait(10)
            listener.kill()
        assert source.returncode == 0


def test_source_inside_serve_runs_and_serves_its_webhook(tmp_path: Path) -> None:
    config = write_config(tmp_path / "spop.toml", resource="778")
    with HubProcess(tmp_path / "hub", "--config", str(config)) as hub:
        listener = listen(hub.address, "778", 2, tmp_path)
        status, answer = http_post(
            f"{hub.http}/v1/sources/front/hook", {"contact_id": "w-2", "resource": "778"}
        )
        assert (status, answer["applied"]) == (200, 2)
        assert sorted(descriptions(listener)) == ["at start", "webhook"]


def test_disabled_source_does_not_run_inside_serve(tmp_path: Path) -> None:
    config = write_config(tmp_path / "spop.toml", resource="779", enabled=False)
    with HubProcess(tmp_path / "hub", "--config", str(config)) as hub:
        status, _ = http_post(
            f"{hub.http}/v1/sources/front/hook", {"contact_id": "w-3", "resource": "779"}
        )
        assert status == 404


def test_remote_sink_sends_again_after_the_hub_restarts(tmp_path: Path) -> None:
    from hubproc import run

    with HubProcess(tmp_path / "hub") as hub:

        async def scenario() -> list[int]:
            sink = RemoteSink(hub.address, retry_for=30)
            first = await sink.send(
                [{"contact_id": "r-1", "event": "queued", "media": "telephone"}]
            )
            hub.kill()
            restarter = asyncio.get_running_loop().run_in_executor(
                None, lambda: (time.sleep(0.5), hub.start())
            )
            second = await sink.send(
                [{"contact_id": "r-2", "event": "queued", "media": "telephone"}]
            )
            await restarter
            await sink.close()
            return [first["applied"], second["applied"]]

        assert run(scenario()) == [1, 1]


@pytest.mark.parametrize("table", [{"type": 5}, {"enabled": "yes"}, {"listen": "nowhere"}])
def test_framework_keys_are_validated(tmp_path: Path, table: dict[str, object]) -> None:
    config = write_config(tmp_path / "spop.toml", **table)
    result = CliRunner().invoke(cli, ["config", "check", "--config", str(config)])
    assert result.exit_code == 12
    assert f"sources.front.{next(iter(table))}" in result.output


def test_plugins_lists_source_types(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["plugins", "--json", "--plugins-dir", str(DATA)])
    assert result.exit_code == 0, result.output
    plugins = {p["name"]: p for p in json.loads(result.output)["plugins"]}
    assert plugins["ticker_source"]["sources"] == ["ticker"]
    assert plugins["ticker_source"]["hooks"] == ["register_sources"]
