"""Cost of contact updates on the hub: contact lifecycles applied per second, journal on.

Each contact is four events, four requests (or one with --one-request) (queued, routed, answered, ended): on a hub with
contact updates it also journals two changes (answered, ended) for the routed resource. Run it
against another checkout to compare: `PYTHONPATH=OTHER/src python benchmarks/contact_updates.py`.
No listener is connected (what a hub pays whether or not anyone asks for updates). Loopback and
a scratch directory only; bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path


async def one_run(contacts: int, directory: Path, separate: bool) -> float:
    from spop_cli.hub.server import Hub, HubConfig

    hub = Hub(
        HubConfig(host="127.0.0.1", port=0, http_port=None, journal=str(directory / "j.sqlite3"))
    )
    await hub.start()
    try:
        started = time.perf_counter()
        for n in range(contacts):
            cid = f"c{n}"
            events = [
                {"contact_id": cid, "event": "queued", "queue_name": "Ventes"},
                {"contact_id": cid, "event": "routed", "resource": f"{n % 100}"},
                {"contact_id": cid, "event": "answered", "resource": f"{n % 100}"},
                {"contact_id": cid, "event": "ended"},
            ]
            if separate:  # as a PBX sends them, each as it happens
                for event in events:
                    await hub.apply_contacts(event)
            else:
                await hub.apply_contacts(events)
        return contacts / (time.perf_counter() - started)
    finally:
        await hub.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contacts", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--one-request", action="store_true", help="all four events in one request (else four)"
    )
    args = parser.parse_args()
    rates = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as scratch:
            rates.append(asyncio.run(one_run(args.contacts, Path(scratch), not args.one_request)))
    import spop_cli

    print(
        f"{spop_cli.__file__}: {args.contacts} contacts x 4 events"
        f" ({'one request' if args.one_request else 'four requests'}), median of {args.runs}:"
        f" {statistics.median(rates):,.0f} contacts/s (runs: {', '.join(f'{r:,.0f}' for r in rates)})"
    )


if __name__ == "__main__":
    main()
