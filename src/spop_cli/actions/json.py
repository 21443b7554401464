"""Built-in action `json`: append each pop as one JSON line (`path = "-"` for standard output).

One object per line, `pop.to_dict()` plus `received_at`, flushed per pop so a `tail -f` or a log
shipper sees it at once.
"""

from __future__ import annotations

import json
import sys
import threading
from json.encoder import encode_basestring  # the standard encoder's own, for ensure_ascii=False
from pathlib import Path
from typing import IO, Any

from ..hookspecs import hookimpl
from ..model import ContactDataCollection, ScreenPopEvent, utc_now_iso
from . import ActionConfigError, check_keys, option


@hookimpl
def register_actions(register):
    register("json", JsonAction)


def pop_record(pop: Any, received_at: str | None = None) -> dict[str, Any]:
    """The line written for a pop; `spop listen --json` prints the same."""
    return {**pop.to_dict(), "received_at": received_at or utc_now_iso()}


def pop_line(pop: Any, received_at: str | None = None) -> str:
    if pop.__class__.to_dict is ScreenPopEvent.to_dict:
        line = _event_line(pop, received_at or utc_now_iso())
        if line is not None:
            return line
    return json.dumps(pop_record(pop, received_at), ensure_ascii=False) + "\n"


def _event_line(pop: ScreenPopEvent, received_at: str) -> str | None:
    """`json.dumps(pop_record(pop), ensure_ascii=False)`'s text for a pop whose fields have the
    types `from_dict` gives them, put together from the standard encoder's own string encoding
    (one call per string, not a dict, an encoder and a walk per pop: a third of the time);
    None for anything else (`json.dumps` then writes it, or says why it cannot)."""
    q = encode_basestring
    wait, data = pop.wait_time, pop.contact_data
    if wait.__class__ is not int or data.__class__ is not ContactDataCollection:
        return None
    try:
        pairs = ", ".join([f"{q(k)}: {q(v)}" for k, v in data.pairs()])
        return (
            f'{{"id": {q(pop.id)}, "media": {q(pop.media._value_)}, "resource": {q(pop.resource)}, '
            f'"contact_id": {q(pop.contact_id)}, "created_at": {q(pop.created_at)}, '
            f'"source": {q(pop.source)}, "destination": {q(pop.destination)}, '
            f'"queue_name": {q(pop.queue_name)}, "contact_description": {q(pop.contact_description)}, '
            f'"from": {q(pop.from_)}, "redirect": {q(pop.redirect)}, "wait_time": {wait!r}, '
            f'"contact_data": {{{pairs}}}, "received_at": {q(received_at)}}}\n'
        )
    except (TypeError, AttributeError):  # a field that is not a string: json.dumps decides
        return None


def change_line(change: Any, received_at: str | None = None) -> str:
    """`spop listen --json`'s line for a contact change: `"type": "change"` first (a pop's
    line has no `type`), then the change's fields and `received_at`."""
    record = {"type": "change", **change.to_dict(), "received_at": received_at or utc_now_iso()}
    return json.dumps(record, ensure_ascii=False) + "\n"


class JsonAction:
    """Appends one line per pop; the file opens at the first pop and stays open."""

    def __init__(self, table: dict[str, Any]) -> None:
        check_keys(table, {"path"})
        path = option(table, "path", str, "-")
        if not path:
            raise ActionConfigError("path", 'must be a file path or "-"')
        self.path = path
        self.name = "json"
        self._file: IO[str] | None = None
        self._lock = threading.Lock()  # one line at a time, whichever thread runs the pop

    def run(self, pop: Any) -> None:
        line = pop_line(pop)
        with self._lock:
            stream = self._open()
            stream.write(line)
            stream.flush()

    def _open(self) -> IO[str]:
        if self.path == "-":
            return sys.stdout
        if self._file is None or self._file.closed:
            target = Path(self.path).expanduser()
            target.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(target, "a", encoding="utf-8")  # noqa: SIM115
        return self._file

    def close(self) -> None:
        with self._lock:
            if self._file is not None and not self._file.closed:
                self._file.close()
