"""The webhook sources read the whole body, however it arrives. An outside check found them
reading only what had arrived with the head: a body sent in two packets, chunked, over TLS or
large was cut (400 invalid_json, or 403 bad_signature for Twilio), and a body that stopped
arriving was applied as far as it came, where /v1/contacts answers 408."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

import pytest

from hubproc import LOOPBACK, loops, on, run
from sourcekit import source_hub
from spop_cli.sources.http_common import MAX_BODY
from test_source_twilio import TABLE as TWILIO
from test_source_twilio import event, sign
from test_source_webhook import CALL, SECRET, connect_table

WEBHOOK = "/v1/sources/connect/events"
TWILIO_PATH = "/v1/sources/tw/events"


async def exchange(
    port: int, path: str, headers: dict[str, str], parts: list[bytes], gap: float = 0.3
) -> tuple[int, Any, bool]:
    """POST `parts` one write at a time, `gap` s apart; (status, JSON body or None, closed)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    head = f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    writer.write(head.encode())
    for index, part in enumerate(parts):
        if index:
            await asyncio.sleep(gap)
        writer.write(part)
        await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    status = int(answer.split(b" ", 2)[1])
    fields = dict(
        line.split(": ", 1) for line in answer.decode().lower().split("\r\n")[1:] if ": " in line
    )
    body = await reader.readexactly(int(fields.get("content-length", "0")))
    closed = fields.get("connection") == "close"
    writer.close()
    return status, json.loads(body) if body else None, closed


def chunked(*parts: bytes) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(part), part) for part in parts] + [b"0\r\n\r\n"]


def webhook_headers(**extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Spop-Secret": SECRET, **extra}


def twilio_request(port: int) -> tuple[dict[str, str], bytes]:
    params = event("task.created")
    url = f"http://127.0.0.1:{port}{TWILIO_PATH}"
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": sign(url, params),
    }
    return headers, urlencode(params).encode()


@pytest.mark.parametrize("runner", loops())
def test_a_body_in_two_packets_is_read_whole(runner: Any) -> None:
    async def body() -> None:
        async with source_hub("connect", connect_table()) as hub:
            raw = json.dumps(CALL["INITIATED"]).encode()
            headers = webhook_headers(**{"Content-Length": str(len(raw))})
            answer = await exchange(hub.http_port, WEBHOOK, headers, [raw[:5], raw[5:]])
            assert answer == (200, {"applied": 1, "pops": [], "matched": ["initiated"]}, False)
            assert hub.status()["contacts"] == 1
        async with source_hub("tw", TWILIO) as hub:
            headers, raw = twilio_request(hub.http_port)
            headers["Content-Length"] = str(len(raw))
            answer = await exchange(hub.http_port, TWILIO_PATH, headers, [raw[:7], raw[7:]])
            assert answer == (204, None, False)
            assert hub.status()["contacts"] == 1

    on(runner, body())


def test_a_chunked_body_is_read_whole() -> None:
    async def body() -> None:
        async with source_hub("connect", connect_table()) as hub:
            raw = json.dumps(CALL["INITIATED"]).encode()
            headers = webhook_headers(**{"Transfer-Encoding": "chunked"})
            parts = chunked(raw[:10], raw[10:40], raw[40:])
            answer = await exchange(hub.http_port, WEBHOOK, headers, parts, gap=0.1)
            assert answer == (200, {"applied": 1, "pops": [], "matched": ["initiated"]}, False)
        async with source_hub("tw", TWILIO) as hub:
            headers, raw = twilio_request(hub.http_port)
            headers["Transfer-Encoding"] = "chunked"
            parts = chunked(raw[:3], raw[3:])
            answer = await exchange(hub.http_port, TWILIO_PATH, headers, parts, gap=0.1)
            assert answer == (204, None, False)

    run(body())


def padded(size: int) -> bytes:
    """The INITIATED event padded with spaces to exactly `size` bytes (still valid JSON)."""
    raw = json.dumps(CALL["INITIATED"]).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_a_body_of_exactly_the_limit_is_read_whole_and_one_byte_more_is_413() -> None:
    async def body() -> None:
        async with source_hub("connect", connect_table(), max_body=4 * MAX_BODY) as hub:
            at_limit = padded(MAX_BODY)
            assert len(at_limit) == 1_048_576
            parts = [at_limit[i : i + 100_000] for i in range(0, MAX_BODY, 100_000)]
            headers = webhook_headers(**{"Transfer-Encoding": "chunked"})
            answer = await exchange(hub.http_port, WEBHOOK, headers, chunked(*parts), gap=0.01)
            assert answer == (200, {"applied": 1, "pops": [], "matched": ["initiated"]}, False)
            over = padded(MAX_BODY + 1)
            parts = [over[i : i + 100_000] for i in range(0, MAX_BODY + 1, 100_000)]
            status, problem, _ = await exchange(
                hub.http_port, WEBHOOK, headers, chunked(*parts), gap=0.01
            )
            assert (status, problem) == (
                413,
                {"error": "too_large", "message": "body over the 1048576 byte limit"},
            )

    run(body())


def test_a_body_that_stops_arriving_is_408_and_applies_nothing() -> None:
    async def body() -> None:
        async with source_hub("connect", connect_table(), http_body_timeout=0.5) as hub:
            raw = json.dumps(CALL["INITIATED"]).encode()
            headers = webhook_headers(**{"Content-Length": str(len(raw) + 50)})
            answer = await exchange(hub.http_port, WEBHOOK, headers, [raw])
            message = "body not received within 0.5 s"
            assert answer == (408, {"error": "timeout", "message": message}, True)
            assert hub.status()["contacts"] == 0
        async with source_hub("tw", TWILIO, http_body_timeout=0.5) as hub:
            headers, raw = twilio_request(hub.http_port)
            headers["Content-Length"] = str(len(raw) + 10)
            answer = await exchange(hub.http_port, TWILIO_PATH, headers, [raw])
            assert answer == (408, {"error": "timeout", "message": message}, True)
            assert hub.status()["contacts"] == 0

    run(body())
