"""The real agent through a RabbitMQ cluster: Gatepass tokens, no agent changes.

A gateway with the RabbitMQ profile, a 2-node RabbitMQ cluster configured from
`gatepass-gateway rabbitmq config`, and the enforcer (`gatepass-gateway rabbitmq
enforce`) are shared by the module, as in `tests/test_rabbitmq.py`. The agent CLI
enrolls with the gateway and runs against node A with `--mqtt mqtt://...`; an
independent backend (its own certificate and tokens, paho, persistent session) listens
on node B and records every `seq`, duplicates included.

With `token_lifetime = 10` the enforcer closes any session older than 10 s, so an
agent that did not reconnect with a fresh token before expiry would be seen closed
(the backend, which does not refresh ahead of time, is the positive control).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.collector import SeqRecorder
from tests.gatewayproc import GatewayProcess, cli, run_cli, wait_for
from tests.rabbitmqproc import (
    MANAGEMENT_PASSWORD,
    MANAGEMENT_USER,
    RabbitCluster,
    RabbitNode,
    gateway_cluster,
    rabbitmq_gateway,
)
from tests.test_agent_e2e import agent_run, enroll_agent, finish
from tests.test_rabbitmq import Device, enroll_device

pytestmark = pytest.mark.timeout(240)

TOKEN_LIFETIME = 10
TELEMETRY = "devices/+/telemetry"


# --- module fixtures: gateway, cluster, enforcer ----------------------------------------------


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with rabbitmq_gateway(tmp_path_factory.mktemp("agent-rmq-gw"), TOKEN_LIFETIME) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def cluster(
    gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RabbitCluster]:
    with gateway_cluster(gw, tmp_path_factory.mktemp("agent-rmq")) as started:
        yield started


@pytest.fixture(scope="module")
def node_a(cluster: RabbitCluster) -> RabbitNode:
    return cluster.nodes[0]


@pytest.fixture(scope="module")
def node_b(cluster: RabbitCluster) -> RabbitNode:
    return cluster.nodes[1]


@pytest.fixture(scope="module")
def enforcer_log(gw: GatewayProcess, node_a: RabbitNode) -> Iterator[Path]:
    """`gatepass-gateway rabbitmq enforce` against the cluster; yields its log file."""
    config = gw.root / "gateway.toml"
    text = config.read_text()
    for key, value in (
        ("rabbitmq_management_url", node_a.management_url),
        ("rabbitmq_management_user", MANAGEMENT_USER),
    ):
        lines = [line for line in text.splitlines() if not line.startswith(f"{key} =")]
        text = "\n".join([*lines, f'{key} = "{value}"']) + "\n"
    config.write_text(text)
    log_path = gw.root / "enforcer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [cli("gatepass-gateway"), "rabbitmq", "enforce", "--dir", str(gw.root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GATEPASS_RABBITMQ_MANAGEMENT_PASSWORD": MANAGEMENT_PASSWORD},
        )
    wait_for(lambda: b"enforcer watching" in log_path.read_bytes(), timeout=15)
    try:
        yield log_path
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()


# --- the independent subscriber -----------------------------------------------------------------


class RabbitBackend:
    """A backend device on RabbitMQ: paho, persistent session, fresh token per connect.

    RabbitMQ keeps its QoS 1 subscription queue while it is away (the enforcer closes
    it at the end of each token's life), so nothing published meanwhile is lost.
    """

    def __init__(self, device: Device, node: RabbitNode) -> None:
        self.device = device
        self.node = node
        self.readings = SeqRecorder()
        self.connects = 0
        self.disconnects = 0
        self._subscribed = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device.device_id,
            clean_session=False,
            protocol=paho.MQTTv311,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self.readings.on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()

    def __enter__(self) -> RabbitBackend:
        self.client.username_pw_set(self.device.device_id, self.device.token())
        self.client.connect("127.0.0.1", self.node.mqtt_port, keepalive=20)
        self.client.loop_start()
        wait_for(self._subscribed.is_set, timeout=20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        self.connects += 1
        client.subscribe(TELEMETRY, qos=1)

    def _on_disconnect(
        self, client: paho.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        self.disconnects += 1
        # paho reconnects by itself; the next attempt must carry an unexpired token.
        try:
            client.username_pw_set(self.device.device_id, self.device.token())
        except (AssertionError, OSError, ValueError):
            pass  # retried at the next disconnect

    def seqs(self, device_id: str) -> list[int]:
        return self.readings.seqs(device_id)

    def has_all(self, device_id: str, count: int) -> bool:
        return self.readings.has_all(device_id, count)


def agent_status(state: Path) -> dict[str, object]:
    out = run_cli("gatepass-agent", "status", "--state", str(state), "--json").stdout
    status: dict[str, object] = json.loads(out)
    return status


def closed_by_enforcer(log_path: Path, device_id: str) -> list[str]:
    return [
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if "closed MQTT connection" in line and f"token of '{device_id}'" in line
    ]


# --- tests ---------------------------------------------------------------------------------------


def test_agent_cli_publishes_through_rabbitmq_to_the_other_node(
    gw: GatewayProcess,
    node_a: RabbitNode,
    node_b: RabbitNode,
    enforcer_log: Path,
    tmp_path: Path,
) -> None:
    state = tmp_path / "agent"
    enroll_agent(gw, state, "rag-1")
    backend = enroll_device(gw, tmp_path, "rbackend-1", "--sub", TELEMETRY)
    with RabbitBackend(backend, node_b) as sub:
        mqtt_url = f"mqtt://127.0.0.1:{node_a.mqtt_port}"
        proc = agent_run(state, "--mqtt", mqtt_url, "--count", "100", "--interval", "0.02")
        rc, output = finish(proc, timeout=60)
        assert rc == 0, output
        wait_for(lambda: sub.has_all("rag-1", 100), timeout=20)
        seqs = sub.seqs("rag-1")
    assert max(seqs) == 100
    print(f"received {len(seqs)} messages, {len(seqs) - len(set(seqs))} QoS 1 duplicates")
    status = agent_status(state)
    assert status["outbox_depth"] == 0 and status["last_seq"] == 100
    assert status["last_error"] is None, status


def test_short_token_lifetime_reconnects_before_expiry_without_loss(
    gw: GatewayProcess,
    node_a: RabbitNode,
    node_b: RabbitNode,
    enforcer_log: Path,
    tmp_path: Path,
) -> None:
    state = tmp_path / "agent"
    enroll_agent(gw, state, "rag-churn")
    backend = enroll_device(gw, tmp_path, "rbackend-churn", "--sub", TELEMETRY)
    with RabbitBackend(backend, node_b) as sub:
        mqtt_url = f"mqtt://127.0.0.1:{node_a.mqtt_port}"
        # 220 readings at 0.1 s: about 22 s, over two token lifetimes.
        proc = agent_run(state, "--mqtt", mqtt_url, "--count", "220", "--interval", "0.1")
        rc, output = finish(proc, timeout=90)
        assert rc == 0, output
        wait_for(lambda: sub.has_all("rag-churn", 220), timeout=30)
        seqs = sub.seqs("rag-churn")
        print(
            f"received {len(seqs)} messages, {len(seqs) - len(set(seqs))} QoS 1 duplicates; "
            f"backend reconnected {sub.connects - 1} times"
        )
    status = agent_status(state)
    assert status["outbox_depth"] == 0 and status["last_seq"] == 220
    assert isinstance(status["connects"], int) and status["connects"] >= 3, status
    assert isinstance(status["token_refreshes"], int) and status["token_refreshes"] >= 3, status
    # The agent always left before its token's life ended: the enforcer never had to
    # close it, while it did close the backend, which only renews after being closed.
    assert closed_by_enforcer(enforcer_log, "rag-churn") == []
    backend_closed = closed_by_enforcer(enforcer_log, "rbackend-churn")
    assert backend_closed and all(line.endswith("expired") for line in backend_closed)
