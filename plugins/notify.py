"""Example plugin: action `notify`, a desktop notification through `notify-send` (libnotify).

    [actions.bubble]
    plugin = "notify"
    title = "{media} call from {source}"           # templates, as everywhere in spop
    body = "{queue_name} · waited {wait_time} s"
    urgency = "critical"                            # low, normal or critical

Without `notify-send` on PATH the action reports a skip saying so (install libnotify-bin).
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from spop_cli import hookimpl
from spop_cli.actions import ActionConfigError, ActionError, ActionSkipped, check_keys, option
from spop_cli.templates import Template, TemplateError, parse_template

URGENCIES = ("low", "normal", "critical")
RUN_TIMEOUT = 5.0


@hookimpl
def register_actions(register):
    register("notify", NotifyAction)


class NotifyAction:
    """Runs `notify-send [options] -- TITLE BODY`: an argv, never a shell, and `--` so a caller's
    number that starts with a dash is text, not an option."""

    def __init__(self, table: dict[str, Any]) -> None:
        check_keys(table, {"title", "body", "urgency", "expire_ms"})
        self.title = _template(table, "title", "{media} pop: {source}")
        self.body = _template(
            table, "body", "{queue_name} {contact_description} (waited {wait_time} s)"
        )
        self.urgency = option(table, "urgency", str, "normal")
        if self.urgency not in URGENCIES:
            raise ActionConfigError("urgency", f"must be one of {', '.join(URGENCIES)}")
        self.expire_ms = option(table, "expire_ms", int)
        self.name = "notify"

    def command_line(self, program: str, pop: Any) -> list[str]:
        argv = [program, "--app-name=spop", f"--urgency={self.urgency}"]
        if self.expire_ms is not None:
            argv.append(f"--expire-time={self.expire_ms}")
        return [*argv, "--", self.title.render(pop), self.body.render(pop)]

    def run(self, pop: Any) -> None:
        program = shutil.which("notify-send")
        if program is None:
            raise ActionSkipped("notify-send not found on PATH (install libnotify-bin)")
        try:
            result = subprocess.run(
                self.command_line(program, pop),
                capture_output=True,
                timeout=RUN_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ActionError(f"notify-send did not return in {RUN_TIMEOUT:g} s") from None
        if result.returncode != 0:
            detail = result.stderr.decode("utf-8", "replace").strip()
            raise ActionError(f"notify-send exited {result.returncode}: {detail}")


def _template(table: dict[str, Any], key: str, default: str) -> Template:
    try:
        return parse_template(option(table, key, str, default))
    except TemplateError as exc:
        raise ActionConfigError(key, str(exc)) from None
