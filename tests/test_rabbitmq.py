"""The RabbitMQ profile end to end: a real Gatepass gateway, a real 2-node RabbitMQ cluster.

Devices enroll with the gateway (openssl + curl), get tokens from its token endpoint
(curl, mutual TLS) and use them as MQTT passwords on RabbitMQ (paho, MQTT 3.1.1). The
cluster is configured from `gatepass-gateway rabbitmq config` and shared by the whole
module; the enforcer runs as `gatepass-gateway rabbitmq enforce` only in its tests.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from gateway.rabbitmq import wildcard_match
from tests.gatewayproc import GatewayProcess, cli, init_gateway, run_cli, wait_for
from tests.rabbitmqproc import (
    MANAGEMENT_PASSWORD,
    MANAGEMENT_USER,
    RabbitCluster,
    RabbitNode,
    gateway_cluster,
    rabbitmq_gateway,
)
from tests.test_est_http import register_and_enroll
from tests.test_token_http import get_token

pytestmark = pytest.mark.timeout(240)

TOKEN_LIFETIME = 8
ENFORCE_WITHIN = 2.0


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with rabbitmq_gateway(tmp_path_factory.mktemp("rmq-gw"), TOKEN_LIFETIME) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def cluster(
    gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RabbitCluster]:
    with gateway_cluster(gw, tmp_path_factory.mktemp("rmq")) as started:
        yield started


@pytest.fixture(scope="module")
def node_a(cluster: RabbitCluster) -> RabbitNode:
    return cluster.nodes[0]


@pytest.fixture(scope="module")
def node_b(cluster: RabbitCluster) -> RabbitNode:
    return cluster.nodes[1]


# --- devices and clients -----------------------------------------------------------------------


@dataclass
class Device:
    gw: GatewayProcess
    device_id: str
    key: Path
    cert: Path

    def token(self) -> str:
        status, body, _ = get_token(self.gw, self.cert, self.key)
        assert status == 200, body
        return str(body["access_token"])


def enroll_device(gw: GatewayProcess, work: Path, device_id: str, *acl: str) -> Device:
    key, cert, _ = register_and_enroll(gw, work, device_id, *acl)
    return Device(gw, device_id, key, cert)


@dataclass
class Client:
    """A paho MQTT 3.1.1 client on its own network thread, with recorded events."""

    paho: mqtt.Client
    connack: list[int] = field(default_factory=list)
    disconnected_at: list[float] = field(default_factory=list)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    subacks: list[list[int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def connected(self) -> bool:
        return bool(self.connack) and self.connack[0] == 0 and not self.disconnected_at

    def subscribe(self, filter: str, qos: int = 1) -> None:
        self.paho.subscribe(filter, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.paho.publish(topic, payload, qos)

    def received(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t == topic]

    def stop(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def connect(node: RabbitNode, client_id: str, token: str, username: str | None = None) -> Client:
    paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    paho.username_pw_set(client_id if username is None else username, token)
    client = Client(paho)

    def on_connect(_c: object, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        client.connack.append(rc.value)

    def on_disconnect(_c: object, _u: object, _f: object, _rc: object, _p: object) -> None:
        client.disconnected_at.append(time.time())

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with client.lock:
            client.messages.append((msg.topic, bytes(msg.payload)))

    def on_subscribe(_c: object, _u: object, _m: object, rcs: list[ReasonCode], _p: object) -> None:
        client.subacks.append([rc.value for rc in rcs])

    paho.on_connect = on_connect
    paho.on_disconnect = on_disconnect
    paho.on_message = on_message
    paho.on_subscribe = on_subscribe
    paho.connect("127.0.0.1", node.mqtt_port, keepalive=30)
    paho.loop_start()
    wait_for(lambda: client.connack or client.disconnected_at, timeout=10)
    return client


def connected(node: RabbitNode, client_id: str, token: str) -> Client:
    client = connect(node, client_id, token)
    assert client.connected, f"{client_id}: CONNACK {client.connack}"
    return client


def subscribed(client: Client, filter: str) -> None:
    client.subscribe(filter)
    wait_for(lambda: client.subacks, timeout=10)
    assert client.subacks[-1] == [1], client.subacks


# --- the profile and RabbitMQ's matching ------------------------------------------------------


def test_token_carries_scope_and_both_audiences(gw: GatewayProcess, tmp_path: Path) -> None:
    token = enroll_device(gw, tmp_path, "claims-1").token()
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload["aud"] == ["gatepass-mqtt", "gatepass"]
    assert "gatepass.write:%2F/amq.topic/devices.claims-1.*" in payload["scope"].split(" ")


def test_device_add_refuses_what_rabbitmq_cannot_enforce(gw: GatewayProcess) -> None:
    proc = gw.admin("device", "add", "be-x", "--pub", "devices/+/commands/#", check=False)
    assert proc.returncode == 1
    assert "'+' cannot be granted for publishing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wildcard_model_agrees_with_rabbitmq_code(node_a: RabbitNode) -> None:
    cases = [
        ("devices.dev-1.x", "devices.dev-1.*"),
        ("devices.dev-10.x", "devices.dev-1.*"),
        ("devices.*.t", "devices.%2A.t"),
        ("devices.x.t", "devices.%2A.t"),
        ("a b", "a+b"),
        ("abXb", "a*b"),
        ("abXb", "a*X*b"),
        ("x", "a%zz*"),
        ("", "*"),
        ("caf\u00e9.x", "caf%C3%A9.*"),
        ("devices.dev-1", "devices.dev-1.*"),
    ]
    terms = ",".join(f'{{<<"{s}"/utf8>>,<<"{p}">>}}' for s, p in cases)
    code = f'io:format("~p~n", [[wildcard:match(S, P) || {{S, P}} <- [{terms}]]]), halt().'
    plugins = sorted(
        str(p / "ebin") for p in Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/plugins/*")
    )
    out = subprocess.run(
        ["erl", "-noshell", "-pa", *plugins, "-eval", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=node_a.env,
        check=True,
    ).stdout
    expected = [wildcard_match(s, p) for s, p in cases]
    assert out.strip() == "[" + ",".join(str(e).lower() for e in expected) + "]"


# --- messaging ---------------------------------------------------------------------------------


def test_device_publishes_and_backend_receives(
    gw: GatewayProcess, node_a: RabbitNode, tmp_path: Path
) -> None:
    backend = enroll_device(gw, tmp_path, "backend-1", "--sub", "devices/+/telemetry")
    dev = enroll_device(gw, tmp_path, "pub-1")
    sub = connected(node_a, "backend-1", backend.token())
    subscribed(sub, "devices/+/telemetry")
    pub = connected(node_a, "pub-1", dev.token())
    for seq in range(1, 11):
        pub.publish("devices/pub-1/telemetry", f'{{"seq": {seq}}}'.encode()).wait_for_publish(10)
    wait_for(lambda: len(sub.received("devices/pub-1/telemetry")) == 10, timeout=10)
    assert pub.connected and sub.connected
    pub.stop()
    sub.stop()


def test_cross_device_publish_is_refused(
    gw: GatewayProcess, node_a: RabbitNode, tmp_path: Path
) -> None:
    backend = enroll_device(gw, tmp_path, "backend-2", "--sub", "devices/+/telemetry")
    dev1 = enroll_device(gw, tmp_path, "dev-1")
    dev10 = enroll_device(gw, tmp_path, "dev-10")
    sub = connected(node_a, "backend-2", backend.token())
    subscribed(sub, "devices/+/telemetry")
    attacker = connected(node_a, "dev-1", dev1.token())
    attacker.publish("devices/dev-10/telemetry", b"forged")
    wait_for(lambda: attacker.disconnected_at, timeout=10)  # RabbitMQ closes the connection
    victim = connected(node_a, "dev-10", dev10.token())
    victim.publish("devices/dev-10/telemetry", b"genuine").wait_for_publish(10)
    wait_for(lambda: sub.received("devices/dev-10/telemetry"), timeout=10)
    assert sub.received("devices/dev-10/telemetry") == [b"genuine"]
    victim.stop()
    sub.stop()
    attacker.paho.loop_stop()


def test_cross_device_subscribe_is_refused(
    gw: GatewayProcess, node_a: RabbitNode, tmp_path: Path
) -> None:
    dev = enroll_device(gw, tmp_path, "snoop-1")
    token = dev.token()
    for filter in ("devices/dev-10/commands/#", "devices/+/commands/#", "devices/snoop-1/#"):
        client = connected(node_a, "snoop-1", token)
        client.subscribe(filter)
        wait_for(lambda c=client: c.disconnected_at, timeout=10)  # type: ignore[misc]
        assert client.subacks == [], filter
        client.paho.loop_stop()
    own = connected(node_a, "snoop-1", token)
    subscribed(own, "devices/snoop-1/commands/#")
    own.stop()


def test_cluster_carries_messages_from_node_a_to_node_b(
    gw: GatewayProcess, node_a: RabbitNode, node_b: RabbitNode, tmp_path: Path
) -> None:
    status = node_b.ctl("cluster_status", "--formatter", "json").stdout
    running = json.loads(status)["running_nodes"]
    assert sorted(running) == sorted([node_a.name, node_b.name])
    backend = enroll_device(gw, tmp_path, "backend-b", "--sub", "devices/+/telemetry")
    dev = enroll_device(gw, tmp_path, "cross-1")
    sub = connected(node_b, "backend-b", backend.token())
    subscribed(sub, "devices/+/telemetry")
    pub = connected(node_a, "cross-1", dev.token())
    for seq in range(20):
        pub.publish("devices/cross-1/telemetry", str(seq).encode()).wait_for_publish(10)
    wait_for(lambda: len(sub.received("devices/cross-1/telemetry")) == 20, timeout=10)
    assert sub.received("devices/cross-1/telemetry") == [str(i).encode() for i in range(20)]
    pub.stop()
    sub.stop()


# --- the enforcer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def enforcer(gw: GatewayProcess, node_a: RabbitNode) -> Iterator[subprocess.Popen[bytes]]:
    config = gw.root / "gateway.toml"
    config.write_text(
        config.read_text()
        .replace(
            'rabbitmq_management_url = "http://127.0.0.1:15672"',
            f'rabbitmq_management_url = "{node_a.management_url}"',
        )
        .replace(
            'rabbitmq_management_user = "gatepass-enforcer"',
            f'rabbitmq_management_user = "{MANAGEMENT_USER}"',
        )
    )
    log_path = gw.root / "enforcer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                cli("gatepass-gateway"),
                "rabbitmq",
                "enforce",
                "--dir",
                str(gw.root),
                "--log-level",
                "DEBUG",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GATEPASS_RABBITMQ_MANAGEMENT_PASSWORD": MANAGEMENT_PASSWORD},
        )
    wait_for(lambda: b"enforcer watching" in log_path.read_bytes(), timeout=15)
    try:
        yield proc
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()


def test_enforcer_closes_an_expired_session(
    gw: GatewayProcess, node_b: RabbitNode, enforcer: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    dev = enroll_device(gw, tmp_path, "expiring-1")
    token = dev.token()
    client = connected(node_b, "expiring-1", token)
    connected_at = time.time()
    wait_for(lambda: client.disconnected_at, timeout=TOKEN_LIFETIME + ENFORCE_WITHIN + 2)
    closed_after = client.disconnected_at[0] - connected_at
    assert TOKEN_LIFETIME - 1 <= closed_after <= TOKEN_LIFETIME + ENFORCE_WITHIN, closed_after
    assert "expired" in (gw.root / "enforcer.log").read_text()
    client.paho.loop_stop()


def test_enforcer_closes_a_revoked_devices_session(
    gw: GatewayProcess, node_b: RabbitNode, enforcer: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    dev = enroll_device(gw, tmp_path, "revoked-1")
    client = connected(node_b, "revoked-1", dev.token())
    gw.admin("device", "revoke", "revoked-1")
    revoked_at = time.time()
    wait_for(lambda: client.disconnected_at, timeout=ENFORCE_WITHIN + 3)
    assert client.disconnected_at[0] - revoked_at <= ENFORCE_WITHIN
    client.paho.loop_stop()


def test_enforcer_closes_a_client_id_takeover(
    gw: GatewayProcess,
    node_a: RabbitNode,
    node_b: RabbitNode,
    enforcer: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    victim_dev = enroll_device(gw, tmp_path, "victim-1")
    thief_dev = enroll_device(gw, tmp_path, "thief-1")
    victim = connected(node_a, "victim-1", victim_dev.token())
    victim.paho.reconnect_delay_set(min_delay=60, max_delay=60)  # no ping-pong with the thief
    thief = connect(node_b, "victim-1", thief_dev.token(), username="victim-1")
    connected_at = time.time()
    assert thief.connected  # RabbitMQ itself lets it in ...
    wait_for(lambda: victim.disconnected_at, timeout=5)  # ... and drops the real device
    wait_for(lambda: thief.disconnected_at, timeout=ENFORCE_WITHIN + 3)
    assert thief.disconnected_at[0] - connected_at <= ENFORCE_WITHIN
    log = gw.root / "enforcer.log"
    wait_for(lambda: "(client 'victim-1', token of 'thief-1'" in log.read_text(), timeout=5)
    assert "identity" in log.read_text()
    back = connected(node_a, "victim-1", victim_dev.token())  # the real device reconnects
    assert back.connected
    back.stop()
    victim.paho.loop_stop()
    thief.paho.loop_stop()


# --- key rotation --------------------------------------------------------------------------------


def test_key_rotation_procedure(
    gw: GatewayProcess, cluster: RabbitCluster, node_a: RabbitNode, tmp_path: Path
) -> None:
    dev = enroll_device(gw, tmp_path, "rotating-1")
    gw.admin("keys", "rotate")
    token = wait_for(lambda: _signed_by_new_key(gw, dev), timeout=10)
    assert token is not None
    refused = connect(node_a, "rotating-1", token)
    # The nodes do not know the new key yet: RabbitMQ answers 3.1.1 return code 4 (bad
    # user name or password; paho reports it as 134), not the 5 of the built-in broker.
    assert refused.connack == [134]
    refused.paho.loop_stop()
    out = gw.admin("rabbitmq", "config", "--out", str(cluster.base / "keys")).stdout
    commands = [line[4:].strip() for line in out.splitlines() if "add_uaa_key" in line]
    for node in cluster.nodes:
        for command in commands:
            args = command.split()[3:]  # after "rabbitmqctl -n NODE"
            node.ctl(*args)
    for node in cluster.nodes:
        client = connected(node, "rotating-1", token)
        client.stop()


def _signed_by_new_key(gw: GatewayProcess, dev: Device) -> str | None:
    current = json.loads(
        run_cli("gatepass-gateway", "keys", "list", "--dir", str(gw.root), "--json").stdout
    )
    kid = next(k["kid"] for k in current if k["state"] == "current")
    token = dev.token()
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    return token if header["kid"] == kid else None


def test_printed_key_commands_survive_a_kid_starting_with_a_dash(tmp_path: Path) -> None:
    # Found when a rotation drew a kid like "-o1Ext...": rabbitmqctl read it as an option.
    root = init_gateway(tmp_path / "gw")
    out = run_cli("gatepass-gateway", "rabbitmq", "config", "--dir", str(root)).stdout
    commands = [line for line in out.splitlines() if "add_uaa_key" in line]
    assert commands
    for command in commands:
        kid = command.rsplit(" ", 1)[1]
        assert command.endswith(f" -- {kid}")
