"""Messages per second: RabbitMQ with Gatepass tokens vs the built-in broker, same run.

One real gateway (profile `rabbitmq = true`) enrolls a publisher and a subscriber
(openssl + curl) and issues their tokens; the same paho clients and the same tokens
then run the same workload against the gateway's own MQTT listener (TLS, client
certificate) and against a RabbitMQ 3.10 node started as a subprocess (plain TCP, as
in FINDINGS). Workload: one publisher -> one subscriber on `devices/<id>/telemetry`,
QoS 0 and QoS 1; throughput = messages / (last delivery - first publish).

    .venv/bin/python -m bench.rabbitmq [--messages N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.gatewayproc import GatewayProcess, init_gateway, running_gateway
from tests.rabbitmqproc import rabbit_cluster
from tests.test_est_http import enroll, first_cert, make_csr, pkcs7_to_pem
from tests.test_token_http import get_token

Factory = Callable[[str, str], mqtt.Client]


def _device(gw: GatewayProcess, work: Path, device_id: str, *acl: str) -> tuple[Path, Path, str]:
    secret = gw.add_device(device_id, *acl)
    key, csr = make_csr(work, device_id)
    status, body, _ = enroll(gw, device_id, secret, csr)
    assert status == 200, body
    cert = first_cert(work, pkcs7_to_pem(work, body, device_id), device_id)
    status, token_body, _ = get_token(gw, cert, key)
    assert status == 200, token_body
    return key, cert, str(token_body["access_token"])


def _client(client_id: str, token: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(client_id, token)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    return client


def _run(
    make: Factory,
    host_port: tuple[str, int],
    pub: tuple[str, str],
    sub: tuple[str, str],
    messages: int,
    qos: int,
) -> float:
    received = threading.Event()
    count = [0]
    first_publish = [0.0]
    last_delivery = [0.0]
    subscribed = threading.Event()

    def on_message(_c: object, _u: object, _m: object) -> None:
        count[0] += 1
        if count[0] == messages:
            last_delivery[0] = time.perf_counter()
            received.set()

    subscriber = make(*sub)
    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *_: subscribed.set()
    subscriber.connect(*host_port)
    subscriber.loop_start()
    subscriber.subscribe("devices/+/telemetry", qos)
    if not subscribed.wait(15):
        raise RuntimeError("subscription not acknowledged")
    publisher = make(*pub)
    publisher.connect(*host_port)
    publisher.loop_start()
    topic = f"devices/{pub[0]}/telemetry"
    payload = b'{"seq": 0, "v": 21.5}'
    first_publish[0] = time.perf_counter()
    infos = [publisher.publish(topic, payload, qos) for _ in range(messages)]
    if not received.wait(120):
        raise RuntimeError(f"only {count[0]} of {messages} messages delivered")
    for info in infos[-1:]:
        info.wait_for_publish(30)
    for client in (publisher, subscriber):
        client.disconnect()
        client.loop_stop()
    return messages / (last_delivery[0] - first_publish[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, Any] = {"messages": args.messages}
    with tempfile.TemporaryDirectory(prefix="gatepass-bench-") as tmp:
        work = Path(tmp)
        root = init_gateway(work / "gw", "rabbitmq = true", "token_lifetime = 600")
        with running_gateway(root) as gw:
            pub_key, pub_cert, pub_token = _device(gw, work, "bench-pub")
            sub_key, sub_cert, sub_token = _device(
                gw, work, "bench-sub", "--sub", "devices/+/telemetry"
            )
            certs = {"bench-pub": (pub_cert, pub_key), "bench-sub": (sub_cert, sub_key)}

            def builtin(client_id: str, token: str) -> mqtt.Client:
                client = _client(client_id, token)
                cert, key = certs[client_id]
                context = ssl.create_default_context(cafile=str(gw.ca))
                context.load_cert_chain(str(cert), str(key))
                client.tls_set_context(context)
                return client

            pub = ("bench-pub", pub_token)
            sub = ("bench-sub", sub_token)
            conf = gw.admin("rabbitmq", "config", "--out", str(work / "keys")).stdout
            with rabbit_cluster(work / "rmq", conf, size=1) as cluster:
                node = cluster.nodes[0]
                for qos in (0, 1):
                    results[f"builtin_qos{qos}"] = _run(
                        builtin, ("127.0.0.1", gw.mqtt_port), pub, sub, args.messages, qos
                    )
                    results[f"rabbitmq_qos{qos}"] = _run(
                        _client, ("127.0.0.1", node.mqtt_port), pub, sub, args.messages, qos
                    )
    for name, value in results.items():
        print(f"{name:>16}: {value:,.0f}" + (" msg/s" if name != "messages" else ""))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
