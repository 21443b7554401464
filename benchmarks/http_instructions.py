"""Instructions per HTTP request in the hub, counted by valgrind: free of machine noise.

    python benchmarks/http_instructions.py [--src DIR] [--requests 300,1300] [--kinds pop,health,ack]

CPU time per request on a shared 2-core machine moves by ±30 % from run to run; an instruction
count does not. The hub (its SQLite journal on, no listeners) runs under `valgrind
--tool=callgrind`; this process, outside valgrind, sends it requests one at a time on one
keep-alive connection, as a source or a browser does: `pop` (`POST /v1/pops`, one pop, a new id
each), `health` (`GET /v1/health`, the floor of any request), `ack` (`POST /v1/browser/ack` of a
signed-in page, one unknown id). Two runs with different request counts, the difference divided
by the requests between them: start-up, imports and shutdown cancel out. The kernel's side of the
system calls is not counted. `--src` runs another tree (e.g. a `git worktree` of an older
commit) for a before/after; valgrind must be installed.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from _common import callgrind_total

HERE = Path(__file__).resolve().parent
TOKEN = "instr-token"  # one token: it may publish and sign a page in


def _request(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    fields = {"Host": "127.0.0.1", "Content-Type": "application/json", **headers}
    if method == "POST":
        fields["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode() + b"\r\n" + body


def _exchange(sock: socket.socket, data: bytes) -> tuple[int, bytes, bytes]:
    sock.sendall(data)
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the hub closed the connection")
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            continue
        head = buf[:end].decode("latin-1")
        length = int(re.search(r"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        if len(buf) >= end + 4 + length:
            return int(head.split()[1]), head.encode(), buf[end + 4 : end + 4 + length]


def _requests(port: int, kind: str, count: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        if kind == "ack":
            status, head, body = _exchange(
                sock, _request("POST", "/v1/browser/session", orjson.dumps({"token": TOKEN}), {})
            )
            cookie = head.split(b"spop_session=")[1].split(b";")[0].decode()
            csrf = orjson.loads(body)["csrf"]
            ack = orjson.dumps({"media": "telephone", "resource": ["6000"], "ids": ["none"]})
            sock.settimeout(600)
            data = _request(
                "POST",
                "/v1/browser/ack",
                ack,
                {"Cookie": f"spop_session={cookie}", "X-Spop-CSRF": csrf},
            )
            for _ in range(count):
                assert _exchange(sock, data)[0] == 200
        elif kind == "health":
            data = _request("GET", "/v1/health", b"", {})
            for _ in range(count):
                assert _exchange(sock, data)[0] == 200
        else:
            for n in range(count):
                pop = {"media": "telephone", "resource": "6000", "id": f"i-{n}", "source": "12345",
                       "queue_name": "Ventes", "contact_data": {"code1": "chaîne1"}}  # fmt: skip
                data = _request(
                    "POST", "/v1/pops", orjson.dumps(pop), {"Authorization": f"Bearer {TOKEN}"}
                )
                assert _exchange(sock, data)[0] == 200


def _count(src: str | None, kind: str, count: int) -> int:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    with tempfile.TemporaryDirectory(prefix="spop-http-instr-") as tmp:
        ready = Path(tmp, "ready.json")
        hub = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
             sys.executable, "-m", "spop_cli", "serve", "--host", "127.0.0.1", "--port", "0",
             "--http-port", "0", "--journal", f"{tmp}/journal.sqlite3", "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**env, "SPOP_TOKEN": TOKEN, "SPOP_DIAG_DIR": tmp},
        )  # fmt: skip
        deadline = time.monotonic() + 600
        while not (ready.exists() and ready.stat().st_size):
            if hub.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the hub did not start:\n{hub.stderr.read()[-2000:]}")  # type: ignore[union-attr]
            time.sleep(0.2)
        port = int(orjson.loads(ready.read_bytes())["http_port"])
        _requests(port, kind, count)
        hub.terminate()
        _, err = hub.communicate(timeout=600)
    return callgrind_total(err)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", help="a source tree to run instead of the installed spop_cli")
    parser.add_argument("--requests", default="300,1300", help="two request counts")
    parser.add_argument("--kinds", default="pop,health,ack")
    args = parser.parse_args()
    low, high = (int(x) for x in args.requests.split(","))
    for kind in args.kinds.split(","):
        started = time.monotonic()
        a, b = _count(args.src, kind, low), _count(args.src, kind, high)
        print(
            f"{kind:7} {(b - a) / (high - low):>10,.0f} instructions per request "
            f"({low} and {high} requests; {time.monotonic() - started:.0f} s under valgrind)",
            flush=True,
        )


if __name__ == "__main__":
    main()
