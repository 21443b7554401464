"""The HTTP port's lean front (hub/fasthttp.py): what it answers itself, what it hands to aiohttp,
and that a request gets the same answer either way.

Raw sockets throughout: the point is which bytes go where on one connection."""

from __future__ import annotations

import json
import random
import re
import socket
import time
from collections.abc import Iterator

import pytest
from multidict import CIMultiDict

from conftest import HubThread, wait_for

TOKEN = "front-listener"
SOURCE = "front-source"
CRM = "https://crm.example"
POP = json.dumps({"media": "telephone", "resource": "6000", "id": "front-1"}).encode()


@pytest.fixture
def hub() -> Iterator[HubThread]:
    running = HubThread(
        token=TOKEN, source_token=SOURCE, http_idle_timeout=1.0, browser_origins=[CRM]
    )
    yield running
    running.close()


def request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    fields = {"Host": "127.0.0.1", **(headers or {})}
    if body or method == "POST":
        fields.setdefault("Content-Type", "application/json")
        fields.setdefault("Content-Length", str(len(body)))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode() + b"\r\n" + body


def pop_request(body: bytes = POP, **headers: str) -> bytes:
    return request("POST", "/v1/pops", body, {"Authorization": f"Bearer {SOURCE}", **headers})


class Conn:
    """One client connection reading whole responses (status, headers, body) off the socket."""

    def __init__(self, hub: HubThread) -> None:
        self.sock = socket.create_connection(("127.0.0.1", hub.options["http_port"]), timeout=10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body

    def exchange(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        self.send(data)
        return self.response()

    def closed(self) -> bool:
        """True once the hub closed its end (read returns EOF)."""
        self.sock.settimeout(0.05)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(10)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the hub")
        self.buffer += data

    def close(self) -> None:
        self.sock.close()


def front(hub: HubThread):  # type: ignore[no-untyped-def]
    assert hub.hub is not None
    return hub.hub._http_runner.front


def test_keep_alive_requests_are_answered_by_the_front(hub: HubThread) -> None:
    conn = Conn(hub)
    try:
        for n in range(3):
            status, headers, body = conn.exchange(
                pop_request(
                    json.dumps({"media": "telephone", "resource": "6000", "id": f"k{n}"}).encode()
                )
            )
            assert status == 200
            assert json.loads(body) == {"accepted": 1, "ids": [f"k{n}"]}
            assert headers["content-type"] == "application/json"
            assert "connection" not in headers
        assert len(front(hub).connections) == 1  # never handed to aiohttp
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(hub: HubThread) -> None:
    conn = Conn(hub)
    try:
        ids = [f"p{n}" for n in range(20)]
        conn.send(
            b"".join(
                pop_request(
                    json.dumps({"media": "telephone", "resource": "6000", "id": i}).encode()
                )
                for i in ids
            )
        )
        answers = [conn.response() for _ in ids]
        assert [json.loads(body)["ids"] for _, _, body in answers] == [[i] for i in ids]
    finally:
        conn.close()


def test_connection_close_is_honoured(hub: HubThread) -> None:
    conn = Conn(hub)
    try:
        status, headers, _ = conn.exchange(pop_request(Connection="close"))
        assert status == 200
        assert headers["connection"] == "close"
        assert wait_for(conn.closed, 5)
    finally:
        conn.close()


def test_a_request_it_does_not_answer_hands_the_connection_to_aiohttp(hub: HubThread) -> None:
    conn = Conn(hub)
    try:
        assert conn.exchange(pop_request())[0] == 200
        status, _, body = conn.exchange(request("GET", "/v1/nowhere"))
        assert status == 404
        assert json.loads(body)["error"] == "not_found"
        assert len(front(hub).connections) == 0
        # aiohttp serves the rest of the connection, with the same handlers
        status, _, body = conn.exchange(
            pop_request(
                json.dumps({"media": "telephone", "resource": "6000", "id": "after"}).encode()
            )
        )
        assert (status, json.loads(body)["ids"]) == (200, ["after"])
    finally:
        conn.close()


def test_a_body_still_on_its_way_is_read_by_aiohttp(hub: HubThread) -> None:
    conn = Conn(hub)
    try:
        data = pop_request()
        head, _, body = data.partition(b"\r\n\r\n")
        conn.send(head + b"\r\n\r\n" + body[:5])
        time.sleep(0.2)
        conn.send(body[5:])
        status, _, answer = conn.response()
        assert (status, json.loads(answer)["ids"]) == (200, ["front-1"])
    finally:
        conn.close()


def test_pipelined_bytes_after_a_handover_are_not_lost(hub: HubThread) -> None:
    conn = Conn(hub)
    try:
        conn.send(
            pop_request()
            + request("GET", "/v1/health")
            + pop_request(
                json.dumps({"media": "telephone", "resource": "6000", "id": "tail"}).encode()
            )
        )
        answers = [conn.response() for _ in range(3)]
        assert [status for status, _, _ in answers] == [200, 200, 200]
        assert json.loads(answers[2][2])["ids"] == ["tail"]
    finally:
        conn.close()


# requests that must reach aiohttp's parser and get its answer, not the front's
HANDED_OVER = [
    ("HTTP/1.0", b"POST /v1/pops HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 401),
    (
        "chunked body",
        b"POST /v1/pops HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        401,
    ),
    (
        "two Content-Length",
        b"POST /v1/pops HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
        400,
    ),
    (
        "folded header",
        b"POST /v1/pops HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n b\r\nContent-Length: 2\r\n\r\n{}",
        400,
    ),
    (
        "space before colon",
        b"POST /v1/pops HTTP/1.1\r\nHost : x\r\nContent-Length: 2\r\n\r\n{}",
        400,
    ),
    (
        "a tab inside a value",
        b"POST /v1/pops HTTP/1.1\r\nHost: x\r\nX-A: a\tAuthorization: Bearer y\r\nContent-Length: 2\r\n\r\n{}",
        401,
    ),
    ("no Host", b"POST /v1/pops HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400),
    ("query string", b"GET /v1/health?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    ("HEAD", b"HEAD /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", 200),
]


@pytest.mark.parametrize("name,data,status", HANDED_OVER, ids=[row[0] for row in HANDED_OVER])
def test_unusual_requests_get_aiohttps_answer(
    hub: HubThread, name: str, data: bytes, status: int
) -> None:
    conn = Conn(hub)
    try:
        conn.send(data)
        assert wait_for(lambda: len(front(hub).connections) == 0, 5)
        if name == "HEAD":
            conn.sock.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200 ")
            return
        assert conn.response()[0] == status
    finally:
        conn.close()


def _sign_in(hub: HubThread) -> tuple[str, str]:
    conn = Conn(hub)
    try:
        status, headers, body = conn.exchange(
            request("POST", "/v1/browser/session", json.dumps({"token": TOKEN}).encode())
        )
        assert status == 200
        cookie = headers["set-cookie"].split(";")[0]
        return cookie, json.loads(body)["csrf"]
    finally:
        conn.close()


def _both_ways(hub: HubThread, data: bytes) -> tuple[tuple[int, dict[str, str], bytes], ...]:
    """The same request answered by the front, then on a connection aiohttp serves."""
    lean, routed = Conn(hub), Conn(hub)
    try:
        first = lean.exchange(data)
        assert routed.exchange(request("GET", "/v1/nowhere"))[0] == 404  # hands it over
        second = routed.exchange(data)
        return first, second
    finally:
        lean.close()
        routed.close()


def same_answer_requests(cookie: str, csrf: str) -> list[tuple[str, bytes]]:
    browser = {"Cookie": cookie, "X-Spop-CSRF": csrf}
    ack = json.dumps({"media": "telephone", "resource": "6000", "ids": ["none"]}).encode()
    return [
        (
            "pop accepted",
            pop_request(json.dumps({"media": "telephone", "resource": "7000"}).encode()),
        ),
        ("pop bad json", pop_request(b"{nope")),
        ("pop unknown field", pop_request(b'{"media": "telephone", "resource": "1", "x": 1}')),
        ("pop wrong token", pop_request(Authorization="Bearer wrong")),
        ("pop listener token", pop_request(Authorization=f"Bearer {TOKEN}")),
        ("pop too deep", pop_request(b"[" * 100 + b"]" * 100)),
        (
            "contacts bad media",
            request(
                "POST",
                "/v1/contacts",
                b'{"events": [{"event": "queued"}]}',
                {"Authorization": f"Bearer {SOURCE}"},
            ),
        ),
        ("health", request("GET", "/v1/health")),
        ("status no token", request("GET", "/v1/status")),
        ("openapi", request("GET", "/openapi.json")),
        ("spop.js", request("GET", "/spop.js")),
        ("panel", request("GET", "/panel")),
        ("ack", request("POST", "/v1/browser/ack", ack, browser)),
        ("ack no csrf", request("POST", "/v1/browser/ack", ack, {"Cookie": cookie})),
        (
            "ack not json",
            request("POST", "/v1/browser/ack", b"ids=1", {**browser, "Content-Type": "text/plain"}),
        ),
        ("ack bad ids", request("POST", "/v1/browser/ack", b'{"ids": 1}', browser)),
        (
            "ack other origin",
            request("POST", "/v1/browser/ack", ack, {**browser, "Origin": "https://evil.example"}),
        ),
        ("session", request("GET", "/v1/browser/session", b"", {"Cookie": cookie})),
        ("session wrong token", request("POST", "/v1/browser/session", b'{"token": "no"}')),
        ("preflight", request("OPTIONS", "/v1/browser/ack", b"", {"Origin": CRM})),
        ("ack from the CRM", request("POST", "/v1/browser/ack", ack, {**browser, "Origin": CRM})),
        (
            "preflight refused",
            request("OPTIONS", "/v1/browser/ack", b"", {"Origin": "https://evil.example"}),
        ),
        ("sign out", request("DELETE", "/v1/browser/session", b"", browser)),
    ]


def test_the_front_and_aiohttp_give_the_same_answers(hub: HubThread) -> None:
    cookie, csrf = _sign_in(hub)
    for name, data in same_answer_requests(cookie, csrf):
        lean, routed = _both_ways(hub, data)
        assert lean[0] == routed[0], name
        assert lean[2] == routed[2] or name == "pop accepted", name  # a new id each time
        skip = {"date"}
        assert {k: v for k, v in lean[1].items() if k not in skip} == {
            k: v for k, v in routed[1].items() if k not in skip
        }, name


def test_sign_in_through_the_front_sets_the_same_cookie_attributes(hub: HubThread) -> None:
    lean, routed = _both_ways(
        hub, request("POST", "/v1/browser/session", json.dumps({"token": TOKEN}).encode())
    )
    assert lean[0] == routed[0] == 200

    def attributes(headers: dict[str, str]) -> list[str]:
        return sorted(
            part.strip().split("=")[0].lower() for part in headers["set-cookie"].split(";")
        )

    assert (
        attributes(lean[1])
        == attributes(routed[1])
        == sorted(["spop_session", "httponly", "max-age", "path", "samesite"])
    )


def test_an_idle_connection_is_closed_after_http_idle_timeout(hub: HubThread) -> None:
    conn = Conn(hub)
    try:
        assert conn.exchange(pop_request())[0] == 200
        time.sleep(0.5)
        assert not conn.closed()  # half the timeout: still open
        assert wait_for(conn.closed, 4)
        assert len(front(hub).connections) == 0
    finally:
        conn.close()


def test_a_connection_that_never_finishes_its_head_is_closed_too(hub: HubThread) -> None:
    conn = Conn(hub)
    try:
        conn.send(b"POST /v1/pops HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.5)
        assert not conn.closed()
        assert wait_for(conn.closed, 4)
    finally:
        conn.close()


def test_the_hub_stops_with_front_connections_open(hub: HubThread) -> None:
    conns = [Conn(hub) for _ in range(5)]
    try:
        for conn in conns:
            assert conn.exchange(pop_request())[0] == 200
        conns[0].send(b"POST /v1/pops HTTP/1.1\r\n")  # one mid-head
        started = time.monotonic()
        hub.stop()
        assert time.monotonic() - started < 5
        assert all(wait_for(conn.closed, 5) for conn in conns)
    finally:
        for conn in conns:
            conn.close()


def test_a_peer_that_does_not_read_its_answers_stops_the_answering(hub: HubThread) -> None:
    """Pipelined requests from a peer that never reads: the answers stop at the transport's high
    mark instead of piling up in the hub, and all come once it reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", hub.options["http_port"]))
    conn = Conn.__new__(Conn)
    conn.sock, conn.buffer = sock, b""
    count = 20_000
    try:
        conn.send(request("GET", "/v1/health") * count)
        assert wait_for(lambda: any(c.blocked for c in front(hub).connections), 30)
        (lean,) = front(hub).connections
        assert lean.transport.get_write_buffer_size() < 80_000
        answers = [conn.response() for _ in range(count)]
        assert [status for status, _, _ in answers] == [200] * count
    finally:
        sock.close()


def test_answers_that_wait_for_the_journal_commit_come_in_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With a journal a pop's answer waits for its commit (a task finishes it); pipelined pops
    and a health check between them are still answered in order, each once committed."""
    running = HubThread(source_token=SOURCE, journal=str(tmp_path / "journal.sqlite3"))
    try:
        conn = Conn(running)
        ids = [f"j{n}" for n in range(30)]
        data = [
            pop_request(json.dumps({"media": "telephone", "resource": "6000", "id": i}).encode())
            for i in ids
        ]
        conn.send(b"".join(data[:15]) + request("GET", "/v1/health") + b"".join(data[15:]))
        answers = [conn.response() for _ in range(31)]
        assert [s for s, _, _ in answers] == [200] * 31
        bodies = [json.loads(b) for _, _, b in answers]
        assert bodies[15]["status"] == "ok"
        assert [b["ids"] for b in bodies[:15] + bodies[16:]] == [[i] for i in ids]
        assert running.status()["pending"] == 30
        conn.close()
    finally:
        running.close()


# The front's head parser as it was written first (two regular expressions): the reference the
# faster line-by-line parser (a cache of lines seen) must agree with on every head.
_TOKEN_RE = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD_RE = re.compile(rf"({_TOKEN_RE}):[ \t]*([\x20-\x7e]*?)[ \t]*\r\n")
_FIELDS_RE = re.compile(rf"(?:{_TOKEN_RE}:[ \t]*[\x20-\x7e]*\r\n)*")


def _reference_parse(routes: dict[tuple[str, str], int], max_body: int, head: str):  # type: ignore[no-untyped-def]
    if not head.isascii():
        return None
    line_end = head.find("\r\n")
    parts = (head[:line_end] if line_end >= 0 else head).split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or (parts[0], parts[1]) not in routes:
        return None
    method, path = parts[0], parts[1]
    fields = head[line_end + 2 :] + "\r\n" if line_end >= 0 else ""
    if _FIELDS_RE.fullmatch(fields) is None:
        return None
    pairs = _FIELD_RE.findall(fields)
    if len(pairs) != fields.count("\r\n"):
        return None
    headers = CIMultiDict(pairs)
    lengths = headers.getall("Content-Length", ("0",) if method != "POST" else ())
    if (
        len(lengths) != 1
        or not lengths[0].isdigit()
        or len(lengths[0]) > 12
        or any(name in headers for name in ("Transfer-Encoding", "Expect", "Upgrade"))
        or len(headers.getall("Host", ())) != 1
        or int(lengths[0]) > max_body
    ):
        return None
    connection = headers.getall("Connection", ())
    if connection and (
        len(connection) != 1 or connection[0].lower() not in ("close", "keep-alive")
    ):
        return None
    close = bool(connection) and connection[0].lower() == "close"
    authorization = headers.get("Authorization", "")
    return (
        routes[(method, path)],
        method,
        path,
        list(headers.items()),
        authorization,
        int(lengths[0]),
        close,
    )


def test_the_head_parser_agrees_with_the_reference_on_random_heads() -> None:
    from spop_cli.hub.fasthttp import FastHTTP

    class Front:
        routes = {("POST", "/v1/pops"): 1, ("GET", "/v1/health"): 2}
        max_body = 1000

    conn = FastHTTP.__new__(FastHTTP)
    conn.front = Front()  # type: ignore[assignment]
    names = ["Host", "host", "HOST", "Content-Length", "content-length", "Connection", "Expect",
             "Upgrade", "Transfer-Encoding", "X-A", "Authorization", "authorization", "", "Bad Name",
             "é", "X\x00", "Na\tme", "X_y!#"]  # fmt: skip
    values = ["", " ", "  x", "x  ", "\tx", "x\t", "12", "0", "007", "1234567890123", "close",
              "Keep-Alive", "keep-alive, close", "a\x7fb", "a\x01", "Bearer t", "é", " \t ", "a:b",
              "\r", "\n", "-1", "१२"]  # fmt: skip
    starts = ["POST /v1/pops HTTP/1.1", "GET /v1/health HTTP/1.1", "GET /v1/health HTTP/1.0",
              "POST /x HTTP/1.1"]  # fmt: skip
    rng = random.Random(15)
    accepted = 0
    for _ in range(30_000):
        lines = ["Host: x", "Content-Length: 2"] if rng.random() < 0.8 else []
        for _ in range(rng.randint(0, 3)):
            separator = rng.choice([": ", ":", " : ", ":\t", ": \t"])
            lines.append(
                rng.choice(names) + separator + rng.choice(values) + rng.choice(["", " ", "\t"])
            )
        rng.shuffle(lines)
        head = "\r\n".join([rng.choice(starts), *lines])
        expected = _reference_parse(Front.routes, Front.max_body, head)
        got = conn._parse(head)
        assert got == expected, repr(head)
        accepted += got is not None
    assert accepted > 2000  # the comparison covered heads the front answers, not only refusals


@pytest.mark.parametrize("status", [200, 400, 401, 403, 413, 422, 500, 503])
@pytest.mark.parametrize("close", [False, True])
def test_a_json_answer_is_the_bytes_of_the_response_aiohttps_path_builds(
    status: int, close: bool
) -> None:
    from aiohttp import web

    from spop_cli.hub.fasthttp import JsonAnswer, _serialise

    body = json.dumps({"accepted": 1, "ids": ["é-1"]}).encode()
    model = web.Response(body=body, status=status, content_type="application/json")

    def undated(data: bytes) -> bytes:  # the same but for a second ticking over between the two
        return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\n", data)

    ours = JsonAnswer(body, status).serialise(close)
    assert b"\r\nDate: " in ours
    assert undated(ours) == undated(_serialise(model, close))


def test_long_header_lines_are_parsed_each_time_not_kept() -> None:
    """The parser keeps the parse of short lines only: the cache stays small whatever is sent."""
    from spop_cli.hub import fasthttp

    class Front:
        routes = {("GET", "/v1/health"): 1}
        max_body = 1000

    conn = fasthttp.FastHTTP.__new__(fasthttp.FastHTTP)
    conn.front = Front()  # type: ignore[assignment]
    long = "X-Long: " + "v" * 1000
    head = f"GET /v1/health HTTP/1.1\r\nHost: x\r\n{long}  "
    for _ in range(2):
        assert conn._parse(head) == (
            1,
            "GET",
            "/v1/health",
            [("Host", "x"), ("X-Long", "v" * 1000)],
            "",
            0,
            False,
        )
    assert long + "  " not in fasthttp._LINES
    assert "Host: x" in fasthttp._LINES
