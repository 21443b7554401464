"""`spop simulate`: play a scenario's contact events into a hub, at once or in real time."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from . import client
from .scenario import Scenario, timeline


def prefixed(events: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """Give every contact id a run prefix, so two runs never touch the same contact."""
    return [{**event, "contact_id": f"{prefix}{event['contact_id']}"} for event in events]


async def play(
    scenario: Scenario,
    server: str,
    *,
    realtime: bool = False,
    prefix: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Send the scenario; without realtime, `at` times carry the waits so nothing sleeps."""
    prefix = f"{uuid.uuid4().hex[:8]}-" if prefix is None else prefix
    total = sum(after for after, _ in scenario.events)
    start = datetime.now(UTC) - timedelta(seconds=0 if realtime else total)
    events = prefixed(timeline(scenario, start), prefix)
    if not realtime:
        return await client.send_contacts(server, events, **options)
    result: dict[str, Any] = {"applied": 0, "pops": []}
    for (after, _), event in zip(scenario.events, events, strict=True):
        await asyncio.sleep(after)
        event.pop("at", None)  # the hub stamps it on receipt
        answer = await client.send_contacts(server, [event], **options)
        result["applied"] += answer["applied"]
        result["pops"].extend(answer["pops"])
    return result
