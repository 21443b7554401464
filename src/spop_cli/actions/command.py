"""Built-in action `command`: run a program with the pop in its arguments and environment.

Never through a shell: `argv` is a list, each `{field}` template fills exactly one argument, and
the program (argv[0]) is literal, so a caller's number can neither add arguments nor pick the
program. One argument can still be an option, though: `sort {source}` with the source
`-o/tmp/x` writes a file. So templated arguments belong after a literal `--`, and
`spop config check` warns about any that comes before one. Every field is also exported as
`SPOP_<FIELD>`, contact data as `SPOP_DATA_<KEY>`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..hookspecs import hookimpl
from ..templates import FieldRef, Template, TemplateError, parse_template, pop_fields
from . import ActionConfigError, ActionError, check_keys, option, positive_seconds

DEFAULT_TIMEOUT = 10.0
KILL_GRACE = 2.0  # the dispatcher waits this much longer, so our own kill is what gets reported
MAX_LOGGED_OUTPUT = 16 * 1024

log = logging.getLogger("spop.listener.actions.command")


@hookimpl
def register_actions(register):
    register("command", CommandAction)


def env_name(key: str) -> str:
    """A contact-data key as an environment variable suffix: upper case, [A-Z0-9_] only."""
    return re.sub(r"[^A-Z0-9_]", "_", key.upper())


def pop_environment(pop: Any) -> dict[str, str]:
    """`SPOP_SOURCE`, `SPOP_QUEUE_NAME`, …, `SPOP_DATA_<KEY>`, and `SPOP_CONTACT_DATA` as JSON."""
    fields = pop_fields(pop)
    env = {
        f"SPOP_{name.upper()}": _clean(value)
        for name, value in fields.items()
        if name != "contact_data"
    }
    data = fields.get("contact_data") or {}
    for key, value in data.items():
        env[f"SPOP_DATA_{env_name(key)}"] = _clean(value)
    env["SPOP_CONTACT_DATA"] = _clean(json.dumps(data, ensure_ascii=False))
    return env


def unguarded_arguments(argv: list[Template]) -> list[int]:
    """Indexes of the arguments a caller's value starts, before any literal `--`.

    A value starting with `-` there is read as an option by most programs. `--phone={source}`
    is not one of them: its literal start keeps it what it is.
    """
    unguarded = []
    for index, template in enumerate(argv[1:], start=1):
        if template.is_literal and template.text == "--":
            break
        if template.parts and isinstance(template.parts[0], FieldRef):
            unguarded.append(index)
    return unguarded


def _clean(value: Any) -> str:
    # NUL cannot travel in argv or the environment; drop it rather than fail the pop.
    return str(value).replace("\0", "")


class CommandAction:
    """Runs `argv` once per pop; a non-zero exit or a timeout is a failure."""

    def __init__(self, table: dict[str, Any]) -> None:
        check_keys(table, {"argv", "env", "cwd"})
        argv = option(table, "argv", list, required=True)
        if not argv:
            raise ActionConfigError("argv", "must name a program")
        self.argv = []
        for index, arg in enumerate(argv):
            if not isinstance(arg, str):
                raise ActionConfigError(f"argv[{index}]", "must be a string")
            try:
                template = parse_template(arg)
            except TemplateError as exc:
                raise ActionConfigError(f"argv[{index}]", str(exc)) from None
            if index == 0 and not template.is_literal:
                raise ActionConfigError("argv[0]", "the program must be literal, not a template")
            self.argv.append(template)
        env = option(table, "env", dict, {})
        for key, value in env.items():
            if not isinstance(value, str):
                raise ActionConfigError(f"env.{key}", "must be a string")
        self.env = dict(env)
        self.cwd = option(table, "cwd", str)
        self.kill_after = positive_seconds(table, "timeout", DEFAULT_TIMEOUT)
        self.timeout = self.kill_after + KILL_GRACE
        self.name = "command"
        self.warnings = [
            (
                f"argv[{index}]",
                "a value starting with '-' would be read as an option: put a literal "
                '"--" before the templated arguments (or pass the value as SPOP_<FIELD>)',
            )
            for index in unguarded_arguments(self.argv)
        ]

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) when the program cannot be run as configured: `spop config check` and
        `spop listen` report it before any pop, instead of failing every pop."""
        program = self.argv[0].text
        if os.sep not in program and not (os.altsep and os.altsep in program):
            if shutil.which(program) is None:
                return [("argv[0]", "program not found on PATH")]
            return []
        path = Path(program).expanduser()
        if not path.is_absolute():
            path = Path(self.cwd or os.getcwd()) / path
        if not path.exists():
            return [("argv[0]", f"program not found: {path}")]
        if not path.is_file():
            return [("argv[0]", f"not a file: {path}")]
        if not os.access(path, os.X_OK):
            return [("argv[0]", f"not executable: {path} (chmod +x it)")]
        return []

    def command_line(self, pop: Any) -> list[str]:
        return [_clean(template.render(pop)) for template in self.argv]

    def environment(self, pop: Any) -> dict[str, str]:
        return {**os.environ, **self.env, **pop_environment(pop)}

    def run(self, pop: Any) -> None:
        argv = self.command_line(pop)
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                argv,
                env=self.environment(pop),
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=sys.platform
                != "win32",  # its own group: a kill reaches its children
            )
        except OSError as exc:
            log.error("command %s cannot start: %s", argv[0], exc)
            raise ActionError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        try:
            stdout, stderr = process.communicate(timeout=self.kill_after)
        except subprocess.TimeoutExpired:
            _kill(process)
            stdout, stderr = _collect_after_kill(process)
            self._log_output(argv, None, time.monotonic() - started, stdout, stderr)
            raise ActionError(
                f"{argv[0]} timed out after {self.kill_after:g} s and was killed"
            ) from None
        self._log_output(argv, process.returncode, time.monotonic() - started, stdout, stderr)
        if process.returncode != 0:
            last = _last_line(stderr) or _last_line(stdout)
            raise ActionError(
                f"{argv[0]} exited with status {process.returncode}" + (f": {last}" if last else "")
            )

    def _log_output(
        self, argv: list[str], status: int | None, seconds: float, stdout: bytes, stderr: bytes
    ) -> None:
        level = logging.INFO if status == 0 else logging.ERROR
        ending = "was killed" if status is None else f"exited {status}"
        log.log(level, "command %r %s after %.3f s", argv, ending, seconds)
        for stream_name, output in (("stdout", stdout), ("stderr", stderr)):
            if output:
                text = output[:MAX_LOGGED_OUTPUT].decode("utf-8", "replace").rstrip()
                log.log(level, "command %s %s:\n%s", argv[0], stream_name, text)


def _kill(process: subprocess.Popen[bytes]) -> None:
    try:
        if sys.platform == "win32":
            process.kill()
        else:
            os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect_after_kill(process: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """What it wrote before the kill; a grandchild that escaped the group must not hang us."""
    try:
        return process.communicate(timeout=KILL_GRACE / 2)
    except subprocess.TimeoutExpired:
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
        process.wait()
        return b"", b""


def _last_line(output: bytes) -> str:
    lines = output.decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:200] if lines else ""
