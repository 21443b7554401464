"""Hub addresses: the guide's `PORT@HOST`, and `HOST:PORT`, `[v6]:PORT`; a comma-separated list
names several hubs of one cluster (a listener fails over from one to the next)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .model import Error, ScreenPopError

DEFAULT_PORT = 6000


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.port}@{self.host}"

    @property
    def url_host(self) -> str:
        """The host as it goes into a URL (IPv6 in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """Parse `6000@host`, `host:6000`, `[::1]:6000`, `::1`, or a bare `host`."""
    raw = (text or "").strip()
    if not raw:
        raise ScreenPopError(Error.SCREENPOP_Initialization_Error, "empty server address")
    host, port = raw, str(default_port)
    if "@" in raw:
        port, _, host = raw.partition("@")
    elif raw.startswith("["):
        inner, sep, rest = raw[1:].partition("]")
        host = inner
        if not sep or (rest and not rest.startswith(":")):
            raise ScreenPopError(Error.SCREENPOP_Initialization_Error, f"bad address {raw!r}")
        port = rest[1:] if rest else str(default_port)
    elif raw.count(":") == 1:
        host, _, port = raw.partition(":")
    host = host.strip().strip("[]")
    if not host:
        raise ScreenPopError(Error.SCREENPOP_Initialization_Error, f"no host in address {raw!r}")
    try:
        number = int(port)
    except ValueError:
        raise ScreenPopError(
            Error.SCREENPOP_Initialization_Error, f"bad port {port!r} in address {raw!r}"
        ) from None
    if not 0 < number < 65536:
        raise ScreenPopError(
            Error.SCREENPOP_Initialization_Error, f"port {number} out of range in {raw!r}"
        )
    return Address(host, number)


def parse_addresses(text: str, default_port: int = DEFAULT_PORT) -> list[Address]:
    """Parse `6000@hub-a,6000@hub-b`: the hubs of a cluster, in the order they are tried.

    One address is a list of one. An empty item (`a,,b`, a trailing comma) is an error, so a
    typo never silently drops a hub."""
    raw = (text or "").strip()
    if not raw:
        raise ScreenPopError(Error.SCREENPOP_Initialization_Error, "empty server address")
    items = raw.split(",")
    if any(not item.strip() for item in items):
        raise ScreenPopError(
            Error.SCREENPOP_Initialization_Error, f"empty item in the address list {raw!r}"
        )
    return [parse_address(item, default_port) for item in items]


def _canonical(address: Address | str) -> str:
    """One spelling per hub (`6000@hub-a` for `hub-a:6000`, `HUB-A:6000`): desktops whose
    lists spell a hub differently still rank it alike."""
    if isinstance(address, str):
        address = parse_address(address)
    return f"{address.port}@{address.host.lower()}"


def desk_identity() -> str:
    """What names this desktop among a site's: host and user (agents sharing a terminal server
    have one host and their own users). It decides the order of the hubs when spreading."""
    import getpass  # here, not at start-up: only a listener with `spread` asks
    import os
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no USER/LOGNAME and no password entry (a container's bare uid)
        user = str(os.getuid()) if hasattr(os, "getuid") else ""
    return f"{socket.gethostname()}/{user}"


def spread_order(addresses: Sequence[Address | str], identity: str) -> list[int]:
    """The hubs in this desktop's order of preference (rendezvous hashing: each hub ranked by a
    hash of the identity and its address). Desktops are spread evenly over the hubs; when one
    hub is lost, its desktops spread evenly over the others, and no other desktop moves. The
    order depends on the addresses, not on their place in the list."""
    import hashlib  # here, not at start-up: only a listener with `spread` asks

    names = [_canonical(a) for a in addresses]

    def weight(index: int) -> bytes:
        text = f"{identity}\n{names[index]}".encode(errors="replace")
        return hashlib.blake2b(text, digest_size=8).digest()

    return sorted(range(len(addresses)), key=weight, reverse=True)
