"""Broker benchmark: messages/s (1 publisher -> 1 subscriber) and CONNECTs/s; prints JSON.

Brokers measured in one run: stock amqtt 0.12.1 (plain TCP, default plugins), the
Gatepass broker (TLS with client certificates, tokens, ACL checks) and mosquitto (plain
TCP) when the binary is installed. Each broker runs in its own thread and event loop
(mosquitto as a subprocess); clients are paho-mqtt 2.2 in this process.

    .venv/bin/python bench/broker.py [--messages 20000] [--clients 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.mqtt_broker import BrokerLimits, SecureBroker
from gateway.tls import client_context
from tests.helpers_mqtt import Device, MqttPki, entries, make_pki

TOPIC = "devices/bench-pub/telemetry"


@dataclass
class Target:
    """How clients reach one broker: port, and per-client TLS and credentials."""

    name: str
    port: int
    configure: Callable[[paho.Client, str], None]
    prepare: Callable[[list[str]], None] = lambda ids: None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoopThread:
    """An asyncio loop in a daemon thread, for a broker under test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@contextlib.contextmanager
def stock_amqtt() -> Iterator[Target]:
    from amqtt.broker import Broker

    port = _free_port()
    loop = LoopThread()
    config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}}

    async def start() -> Broker:
        broker = Broker(config)
        await broker.start()
        return broker

    broker = loop.run(start())
    try:
        yield Target("amqtt-stock-tcp", port, lambda client, cid: None)
    finally:
        loop.run(broker.shutdown())
        loop.close()


@contextlib.contextmanager
def gatepass(pki: MqttPki, device: Device) -> Iterator[Target]:
    loop = LoopThread()
    limits = BrokerLimits(connect_rate=1e6, connect_burst=1_000_000)

    async def start() -> SecureBroker:
        broker = SecureBroker(
            ssl_context=pki.server_context(), verifier=pki.verifier(), port=0, limits=limits
        )
        await broker.start()
        return broker

    broker = loop.run(start())
    acl = entries(("allow", "all", "devices/#"))
    tokens: dict[str, str] = {}

    context = client_context(pki.ca_file, device.cert_file, device.key_file)

    def mint(client_id: str) -> str:
        return pki.token(client_id, thumbprint=device.thumbprint, acl=acl, lifetime=3600)

    def configure(client: paho.Client, client_id: str) -> None:
        client.tls_set_context(context)
        client.username_pw_set(client_id, tokens.get(client_id) or mint(client_id))

    def prepare(ids: list[str]) -> None:  # mint before timing: the bench measures the broker
        tokens.update({cid: mint(cid) for cid in ids})

    try:
        yield Target("gatepass-mtls-token-acl", broker.port, configure, prepare)
    finally:
        loop.run(broker.stop())
        loop.close()


@contextlib.contextmanager
def mosquitto(directory: Path) -> Iterator[Target | None]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        yield None
        return
    port = _free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n")
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield Target("mosquitto-tcp", port, lambda client, cid: None)
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def _client(target: Target, client_id: str) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv311
    )
    target.configure(client, client_id)
    return client


def _connect(client: paho.Client, port: int) -> None:
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if rc == 0 else None
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("no CONNACK")


def throughput(target: Target, qos: int, count: int) -> float:
    """Messages per second, first PUBLISH to last delivery, one publisher, one subscriber."""
    sub, pub = _client(target, "bench-sub"), _client(target, "bench-pub")
    received = 0
    done = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        nonlocal received
        received += 1
        if received >= count:
            done.set()

    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *args: subscribed.set()
    _connect(sub, target.port)
    sub.subscribe(TOPIC, qos)
    subscribed.wait(10)
    pub.max_inflight_messages_set(100)
    pub.max_queued_messages_set(0)
    _connect(pub, target.port)
    payload = b"x" * 64
    started = time.perf_counter()
    for _ in range(count):
        pub.publish(TOPIC, payload, qos=qos)
    done.wait(timeout=max(60.0, count / 200))
    elapsed = time.perf_counter() - started
    for client in (pub, sub):
        client.disconnect()
        client.loop_stop()
    return round(received / elapsed, 1) if received else 0.0


def connect_rate(target: Target, clients: int, workers: int = 8) -> float:
    """CONNECT+CONNACK per second for `clients` sequential sessions over `workers` threads."""
    ids = [f"bench-{i}" for i in range(clients)]
    target.prepare(ids)

    def one(cid: str) -> bool:
        client = _client(target, cid)
        ok = threading.Event()
        client.on_connect = lambda c, u, f, rc, p: ok.set() if rc == 0 else None
        client.connect("127.0.0.1", target.port, keepalive=60)
        deadline = time.monotonic() + 10
        while not ok.is_set() and time.monotonic() < deadline:
            client.loop(timeout=0.01)
        client.disconnect()
        client.loop(timeout=0.01)
        return ok.is_set()

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, ids))
    elapsed = time.perf_counter() - started
    return round(sum(results) / elapsed, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=1_000)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    report: dict[str, Any] = {
        "messages": args.messages,
        "clients": args.clients,
        "msgs_per_s": {},
        "connects_per_s": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp))
        device = pki.device("bench")
        with stock_amqtt() as stock:
            report["msgs_per_s"][stock.name] = {
                f"qos{q}": throughput(stock, q, args.messages) for q in (0, 1)
            }
            report["connects_per_s"][stock.name] = connect_rate(stock, args.clients)
        with gatepass(pki, device) as ours:
            report["msgs_per_s"][ours.name] = {
                f"qos{q}": throughput(ours, q, args.messages) for q in (0, 1)
            }
            report["connects_per_s"][ours.name] = connect_rate(ours, args.clients)
        with mosquitto(Path(tmp)) as mosq:
            if mosq is not None:
                report["msgs_per_s"][mosq.name] = {
                    f"qos{q}": throughput(mosq, q, args.messages) for q in (0, 1)
                }
    stock_rates = report["msgs_per_s"]["amqtt-stock-tcp"]
    ours_rates = report["msgs_per_s"]["gatepass-mtls-token-acl"]
    report["gatepass_vs_stock"] = {
        q: round(ours_rates[q] / stock_rates[q], 2) if stock_rates[q] else None for q in stock_rates
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
