"""Built-in action `url`: open a URL built from the pop in the system browser (a CRM search, say).

Every substituted value is percent-encoded (`quote(value, safe="")`), so a caller's data can add
neither a parameter nor a path nor a fragment. Dry run (`dry_run = true` or `SPOP_URL_DRY_RUN=1`)
writes the URL to the action's stream instead of opening it.
"""

from __future__ import annotations

import logging
import os
import re
import webbrowser
from typing import Any
from urllib.parse import quote

from ..hookspecs import hookimpl
from ..templates import TemplateError, parse_template
from . import ActionConfigError, ActionError, check_keys, option, stream_option

log = logging.getLogger("spop.listener.actions.url")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


@hookimpl
def register_actions(register):
    register("url", UrlAction)


def encode_value(value: str) -> str:
    return quote(value, safe="")


class UrlAction:
    """Builds the URL from its template and hands it to `webbrowser.open`."""

    def __init__(self, table: dict[str, Any]) -> None:
        check_keys(table, {"url", "dry_run", "stream"})
        text = option(table, "url", str, required=True)
        try:
            self.template = parse_template(text)
        except TemplateError as exc:
            raise ActionConfigError("url", str(exc)) from None
        prefix = self.template.parts[0] if self.template.parts else ""
        # The scheme must be written in the configuration, never come from a pop's data.
        if not isinstance(prefix, str) or not _SCHEME.match(prefix):
            raise ActionConfigError("url", "must start with a literal scheme such as https://")
        self.dry_run = option(table, "dry_run", bool, False)
        self._stream = stream_option(table)
        self.name = "url"

    def url_for(self, pop: Any) -> str:
        return self.template.render(pop, quote=encode_value)

    def run(self, pop: Any) -> None:
        url = self.url_for(pop)
        if self.dry_run or os.environ.get("SPOP_URL_DRY_RUN", "") not in ("", "0"):
            log.info("url (dry run) %s", url)
            stream = self._stream()
            stream.write(url + "\n")
            stream.flush()
            return
        log.info("url open %s", url)
        if not webbrowser.open(url, new=2):
            raise ActionError(f"no browser could open {url}")
