"""An independent telemetry subscriber for end-to-end tests: a plain paho client.

It is a backend device of its own (certificate from EST via openssl/curl, tokens from
the token endpoint via curl), with a persistent session, that fetches a fresh token
before every reconnect, and records every `seq` it receives per device, duplicates
included (`SeqRecorder`, which the RabbitMQ backend in `tests/test_agent_rabbitmq.py`
uses too).
"""

from __future__ import annotations

import json
import ssl
import threading
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.gatewayproc import GatewayProcess, wait_for
from tests.test_est_http import register_and_enroll
from tests.test_token_http import get_token


class SeqRecorder:
    """Every `seq` received per device (from JSON readings), duplicates included.

    `on_message` is a paho `on_message` callback; it runs on paho's network thread.
    """

    def __init__(self) -> None:
        self._received: dict[str, list[int]] = defaultdict(list)
        self._lock = threading.Lock()

    def on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        body = json.loads(message.payload)
        with self._lock:
            self._received[str(body["device_id"])].append(int(body["seq"]))

    def seqs(self, device_id: str) -> list[int]:
        with self._lock:
            return list(self._received[device_id])

    def has_all(self, device_id: str, count: int) -> bool:
        return set(self.seqs(device_id)) >= set(range(1, count + 1))


class Collector:
    def __init__(
        self,
        gw: GatewayProcess,
        tmp: Path,
        name: str = "backend",
        topic: str = "devices/+/telemetry",
    ) -> None:
        self.gw = gw
        self.name = name
        self.topic = topic
        self.key, self.cert, _ = register_and_enroll(gw, tmp / name, name, "--sub", topic)
        self.readings = SeqRecorder()
        self.subscribed = threading.Event()
        self.client = self._client()

    def _client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.name,
            clean_session=False,
            protocol=paho.MQTTv311,
        )
        ctx = ssl.create_default_context(cafile=str(self.gw.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        client.tls_set_context(ctx)
        client.reconnect_delay_set(0.05, 1)  # type: ignore[arg-type]  # floats work; the stub says int
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self.readings.on_message
        client.on_subscribe = lambda *args: self.subscribed.set()
        return client

    def _token(self) -> str:
        status, body, _ = get_token(self.gw, self.cert, self.key)
        assert status == 200, body
        return str(body["access_token"])

    def start(self) -> Collector:
        self.client.username_pw_set(self.name, self._token())
        self.client.connect("127.0.0.1", self.gw.mqtt_port, keepalive=20)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, timeout=20)
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_disconnect(
        self, client: paho.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        # The next automatic reconnect uses a fresh token (the old one may have expired
        # or the gateway may have restarted); a failure here is retried on the next one.
        try:
            client.username_pw_set(self.name, self._token())
        except (AssertionError, OSError, ValueError):
            pass

    def seqs(self, device_id: str) -> list[int]:
        return self.readings.seqs(device_id)

    def has_all(self, device_id: str, count: int) -> bool:
        return self.readings.has_all(device_id, count)
