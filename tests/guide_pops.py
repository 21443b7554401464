"""The tests' sample pop: the guide's routed call (SPEC §2, scenario 1), in wire and event form."""

from __future__ import annotations

from typing import Any

from spop_cli.model import ScreenPopEvent

GUIDE_POP: dict[str, Any] = {
    "media": "telephone",
    "resource": "13579",
    "source": "12345",
    "destination": "2468",
    "queue_name": "File d'attente des ventes",
    "contact_description": "Ventes",
    "wait_time": 10,
    "contact_data": {"code1": "chaîne1"},
}


# A pop's fields when nothing set them: what scenario expectations leave out.
EMPTY_POP: dict[str, Any] = {
    "source": "",
    "destination": "",
    "queue_name": "",
    "contact_description": "",
    "from": "",
    "redirect": "",
    "wait_time": 0,
    "contact_data": {},
}


def guide_pop(**changes: Any) -> ScreenPopEvent:
    """The routed call as a listener receives it; `changes` use the wire names (`from`, not `from_`)."""
    return ScreenPopEvent.from_dict({**GUIDE_POP, **changes})
