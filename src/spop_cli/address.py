"""Hub addresses: the guide's `PORT@HOST`, and `HOST:PORT`, `[v6]:PORT`; a comma-separated list
names several hubs of one cluster (a listener fails over from one to the next)."""

from __future__ import annotations

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
