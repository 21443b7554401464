"""Load processes for mosquitto with paho-mqtt 2.x clients, QoS 1, one topic per resource.

    python benchmarks/_mqtt_load.py subscribers --port P --n N --conns C
    python benchmarks/_mqtt_load.py publisher --port P

`subscribers`: C paho clients holding N subscriptions (`spop/telephone/<resource>`, QoS 1), driven
by one selector loop in one thread (paho's external-loop API: loop_read / loop_write / loop_misc),
so thousands of clients fit in one process. The "action" is paho's on_message callback; paho sends
the PUBACK after it returns. Same commands and answers as _spop_load.py.

`publisher`: one paho client on its own network thread (loop_start, paho's usual way), QoS 1; open
loop at intended times, or as fast as a window of unacknowledged messages allows.
"""

from __future__ import annotations

import argparse
import os
import selectors
import sys
import threading
import time
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from _common import (
    MEDIA,
    Recorder,
    answer,
    load_args,
    resource_name,
    split_id,
    wait_count,
    wire_pop,
)

monotonic_ns = time.monotonic_ns
loads = orjson.loads
dumps = orjson.dumps
TOPIC = "spop/" + MEDIA + "/"


def new_client(client_id: str) -> mqtt.Client:
    return mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=True,
        protocol=mqtt.MQTTv311,
    )


# ----------------------------------------------------------------------------------- subscribers


class Subscribers:
    def __init__(self, host: str, port: int, n: int, conns: int) -> None:
        self.host, self.port, self.n = host, port, n
        self.conns = max(1, min(conns, n))
        self.runs: dict[str, Recorder] = {}
        self.sel = selectors.DefaultSelector()
        self.clients: list[mqtt.Client] = []
        self.subacks_wanted = 0
        self.disconnects = 0
        self.errors: list[str] = []

    def on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        pop = loads(msg.payload)
        now = monotonic_ns()
        run, seq = split_id(pop["id"])
        rec = self.runs.get(run)
        if rec is None:
            rec = self.runs[run] = Recorder()
        data = pop["contact_data"]
        rec.hit(seq, now - int(data["t"]), now, now - int(data["s"]))

    def on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        topics = userdata
        for k in range(0, len(topics), 200):
            client.subscribe([(TOPIC + t, 1) for t in topics[k : k + 200]])

    def on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any
    ) -> None:
        self.subacks_wanted -= 1

    def on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.disconnects += 1
        if len(self.errors) < 20:
            self.errors.append(f"disconnect: {reason}")

    def start(self, batch: int = 200) -> None:
        for index in range(self.conns):
            topics = [resource_name(i) for i in range(index, self.n, self.conns)]
            client = new_client(f"bench-sub-{os.getpid()}-{index}")
            client.user_data_set(topics)
            client.on_message = self.on_message
            client.on_connect = self.on_connect
            client.on_subscribe = self.on_subscribe
            client.on_disconnect = self.on_disconnect
            self.subacks_wanted += (len(topics) + 199) // 200
            client.connect(self.host, self.port, keepalive=120)
            self.sel.register(client.socket(), selectors.EVENT_READ, client)
            self.clients.append(client)
            if index % batch == batch - 1:
                self.pump(0)
        deadline = time.monotonic() + 120
        while self.subacks_wanted > 0 and time.monotonic() < deadline:
            self.pump(0.05)
        if self.subacks_wanted > 0:
            raise RuntimeError(f"{self.subacks_wanted} SUBACKs missing")

    def pump(self, timeout: float) -> list[bytes]:
        """One round of the selector; returns the stdin lines that arrived."""
        lines: list[bytes] = []
        for key, _ in self.sel.select(timeout):
            client = key.data
            if client is None:
                chunk = os.read(sys.stdin.fileno(), 1 << 16)
                if not chunk:
                    lines.append(b'{"cmd":"quit"}')
                self.stdin_buffer += chunk
                *done, self.stdin_buffer = self.stdin_buffer.split(b"\n")
                lines.extend(d for d in done if d.strip())
                continue
            client.loop_read()
            if client.want_write():
                client.loop_write()
        return lines

    stdin_buffer = b""

    def serve(self) -> None:
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
        last_misc = time.monotonic()
        while True:
            for line in self.pump(0.2):
                cmd = loads(line)
                what = cmd["cmd"]
                if what == "count":
                    rec = self.runs.get(cmd["run"])
                    answer(
                        {"unique": rec.unique() if rec else 0, "received": rec.total if rec else 0}
                    )
                elif what == "report":
                    answer((self.runs.get(cmd["run"]) or Recorder()).report(cmd.get("expected")))
                elif what == "drop":
                    self.runs.pop(cmd["run"], None)
                    answer({"ok": True})
                elif what == "info":
                    answer(
                        {
                            "reconnects": self.disconnects,
                            "errors": self.errors,
                            "links": len(self.clients),
                        }
                    )
                elif what == "quit":
                    for client in self.clients:
                        client.disconnect()
                    answer({"bye": True})
                    return
            if time.monotonic() - last_misc > 5:
                last_misc = time.monotonic()
                for client in self.clients:
                    client.loop_misc()
                    if client.want_write():
                        client.loop_write()


# ----------------------------------------------------------------------------------- publisher


class Publisher:
    def __init__(self, host: str, port: int) -> None:
        self.client = new_client(f"bench-pub-{os.getpid()}")
        self.client.max_inflight_messages_set(0)  # 0: no limit (open loop)
        self.client.max_queued_messages_set(0)
        self.cond = threading.Condition()
        self.acks = 0
        self.last_ack_ns = 0
        self.connected = threading.Event()
        self.client.on_publish = self.on_publish
        self.client.on_connect = lambda *a: self.connected.set()
        self.client.connect(host, port, keepalive=120)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise ConnectionError("no CONNACK from mosquitto")

    def on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        with self.cond:
            self.acks += 1
            self.last_ack_ns = monotonic_ns()
            self.cond.notify_all()

    def wait_acks(self, target: int, timeout: float) -> bool:
        return wait_count(self.cond, lambda: self.acks, target, timeout)

    def open_loop(self, run: str, rate: float, duration: float, n: int) -> dict[str, Any]:
        total = max(1, int(rate * duration))
        period = 1e9 / rate
        base = self.acks
        start = monotonic_ns() + 2_000_000
        i = 0
        max_lag = 0
        publish = self.client.publish
        while i < total:
            now = monotonic_ns()
            intended = start + int(i * period)
            if now < intended:
                time.sleep((intended - now) / 1e9)
                continue
            due = min(total, int((now - start) / period) + 1)
            max_lag = max(max_lag, now - intended)
            for j in range(i, due):
                res = resource_name(j % n)
                publish(
                    TOPIC + res,
                    dumps(wire_pop(f"{run}-{j}", res, start + int(j * period), monotonic_ns())),
                    qos=1,
                )
            i = due
        sent_end = monotonic_ns()
        complete = self.wait_acks(base + total, 30 + duration)
        return {
            "sent": total,
            "oks": self.acks - base,
            "complete": complete,
            "start_ns": start,
            "send_seconds": (sent_end - start) / 1e9,
            "max_send_lag_ms": round(max_lag / 1e6, 3),
            "errors": [],
            "error_count": 0,
        }

    def window(self, run: str, total: int, window: int, batch: int, n: int) -> dict[str, Any]:
        base = self.acks
        start = monotonic_ns()
        sent = 0
        publish = self.client.publish
        while sent < total:
            with self.cond:
                while sent - (self.acks - base) >= window:
                    self.cond.wait(1.0)
                room = min(window - (sent - (self.acks - base)), total - sent)
            now = monotonic_ns()
            for j in range(sent, sent + room):
                res = resource_name(j % n)
                publish(TOPIC + res, dumps(wire_pop(f"{run}-{j}", res, now, now)), qos=1)
            sent += room
        sent_end = monotonic_ns()
        complete = self.wait_acks(base + total, 60)
        return {
            "sent": sent,
            "oks": self.acks - base,
            "complete": complete,
            "start_ns": start,
            "send_seconds": (sent_end - start) / 1e9,
            "oks_seconds": (self.last_ack_ns - start) / 1e9,
            "errors": [],
            "error_count": 0,
        }


def run_publisher(args: argparse.Namespace) -> None:
    sys.setswitchinterval(0.0005)  # as in _spop_load.py: the sender must not wait for paho's thread
    pub = Publisher(args.host, args.port)
    answer({"ready": True})
    for line in sys.stdin.buffer:
        cmd = loads(line)
        what = cmd["cmd"]
        if what == "open":
            answer(pub.open_loop(cmd["run"], cmd["rate"], cmd["duration"], cmd["n"]))
        elif what == "window":
            answer(pub.window(cmd["run"], cmd["total"], cmd["window"], cmd["batch"], cmd["n"]))
        elif what == "quit":
            break
    pub.client.disconnect()
    pub.client.loop_stop()
    answer({"bye": True})


def main() -> None:
    args = load_args(["subscribers", "publisher"])
    if args.role == "publisher":
        run_publisher(args)
        return
    subs = Subscribers(args.host, args.port, args.n, args.conns)
    t0 = time.monotonic()
    subs.start()
    answer(
        {
            "ready": True,
            "registrations": subs.n,
            "connections": subs.conns,
            "seconds": time.monotonic() - t0,
        }
    )
    subs.serve()


if __name__ == "__main__":
    main()
