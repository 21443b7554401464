"""Example plugin: action `webhook`, an HTTP POST of each pop as JSON to a URL (a CRM, a chat bot).

    [actions.crm_hook]
    plugin = "webhook"
    url = "https://crm.example.com/hooks/pop?agent={resource}"   # values URL-encoded
    headers = { Authorization = "Bearer s3cret" }
    timeout = 5

Load it with `--plugins-dir plugins` or `[plugins] dirs = ["plugins"]`. It runs in its own thread
(a sync `run`), so a slow endpoint delays no other action.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from spop_cli import hookimpl
from spop_cli.actions import ActionConfigError, ActionError, check_keys, option, positive_seconds
from spop_cli.actions.json import pop_record
from spop_cli.templates import TemplateError, parse_template


@hookimpl
def register_actions(register):
    register("webhook", WebhookAction)


class WebhookAction:
    """POSTs `pop.to_dict()` plus `received_at`; any answer but 2xx is a failure."""

    def __init__(self, table: dict[str, Any]) -> None:
        check_keys(table, {"url", "headers"})
        try:
            self.url = parse_template(option(table, "url", str, required=True))
        except TemplateError as exc:
            raise ActionConfigError("url", str(exc)) from None
        first = self.url.parts[0] if self.url.parts else ""
        if not isinstance(first, str) or not first.startswith(("http://", "https://")):
            raise ActionConfigError("url", "must start with http:// or https://")
        self.headers = option(table, "headers", dict, {})
        for key, value in self.headers.items():
            if not isinstance(value, str):
                raise ActionConfigError(f"headers.{key}", "must be a string")
        self.http_timeout = positive_seconds(table, "timeout", 5.0)
        self.timeout = self.http_timeout + 1.0  # our own timeout is the one reported
        self.name = "webhook"

    def run(self, pop: Any) -> None:
        url = self.url.render(pop, quote=lambda value: quote(value, safe=""))
        body = json.dumps(pop_record(pop), ensure_ascii=False).encode("utf-8")
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "spop-webhook",
                **self.headers,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.http_timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            raise ActionError(f"{url} answered HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ActionError(f"cannot POST to {url}: {reason}") from None
