"""Hub addresses in the guide's form and the usual ones."""

from __future__ import annotations

import pytest

from spop_cli.address import Address, parse_address
from spop_cli.model import Error, ScreenPopError


@pytest.mark.parametrize(
    "text, host, port",
    [
        ("6000@servername", "servername", 6000),
        ("6000@127.0.0.1", "127.0.0.1", 6000),
        ("servername:6001", "servername", 6001),
        ("[::1]:6000", "::1", 6000),
        ("6000@::1", "::1", 6000),
        ("6000@[::1]", "::1", 6000),
        ("servername", "servername", 6000),
        ("[::1]", "::1", 6000),
        (" 7000@host ", "host", 7000),
    ],
)
def test_address_forms(text: str, host: str, port: int) -> None:
    assert parse_address(text) == Address(host, port)


@pytest.mark.parametrize(
    "text", ["", "abc@host", "6000@", "70000@host", "[::1", "host:x", "0@host"]
)
def test_bad_addresses_are_initialization_errors(text: str) -> None:
    with pytest.raises(ScreenPopError) as info:
        parse_address(text)
    assert info.value.code is Error.SCREENPOP_Initialization_Error


def test_address_prints_in_the_guides_form() -> None:
    assert str(Address("servername", 6000)) == "6000@servername"
    assert Address("::1", 6000).url_host == "[::1]"
