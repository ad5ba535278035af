"""The agent end to end: real gateway and agent processes, an independent subscriber."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.collector import Collector
from tests.gatewayproc import (
    GatewayProcess,
    agent_enroll,
    cli,
    init_gateway,
    run_cli,
    running_gateway,
    start_gateway,
    wait_for,
)
from tests.test_est_http import register_and_enroll
from tests.test_gateway_mqtt import Device, pub

pytestmark = pytest.mark.timeout(240)


def enroll_agent(gw: GatewayProcess, state: Path, device_id: str, *, mqtt: bool = True) -> None:
    """`gatepass-agent enroll`; without `mqtt` the agent learns the MQTT URL itself."""
    secret = gw.add_device(device_id)
    extra = ["--mqtt", f"mqtts://127.0.0.1:{gw.mqtt_port}"] if mqtt else []
    result = agent_enroll(gw.https_url, gw.ca, device_id, secret, state, *extra)
    assert "enrolled" in result.stdout


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[GatewayProcess]:
    with running_gateway(init_gateway(tmp_path / "gw")) as gateway:
        yield gateway


def agent_run(state: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [cli("gatepass-agent"), "run", "--state", str(state), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, (out + err).decode(errors="replace")


def test_enroll_then_run_count_200(gw: GatewayProcess, tmp_path: Path) -> None:
    state = tmp_path / "agent"
    enroll_agent(gw, state, "ag-1", mqtt=False)  # the exact command lines of the SPEC
    key_mode = stat.S_IMODE(os.stat(state / "identity" / "device.key").st_mode)
    assert key_mode == 0o600
    with Collector(gw, tmp_path) as sub:
        rc, output = finish(agent_run(state, "--interval", "0.01", "--count", "200"))
        assert rc == 0, output
        wait_for(lambda: sub.has_all("ag-1", 200), timeout=30)
        seqs = sub.seqs("ag-1")
        assert max(seqs) == 200
        print(f"received {len(seqs)} messages, {len(seqs) - len(set(seqs))} QoS 1 duplicates")
    # Enrolling again is a no-op; status shows an empty outbox.
    again = agent_enroll(gw.https_url, gw.ca, "ag-1", "spent", state)
    assert "already enrolled" in again.stdout
    status = json.loads(run_cli("gatepass-agent", "status", "--state", str(state), "--json").stdout)
    assert status["outbox_depth"] == 0 and status["last_seq"] == 200


def test_agent_killed_and_restarted_loses_nothing(gw: GatewayProcess, tmp_path: Path) -> None:
    state = tmp_path / "agent"
    enroll_agent(gw, state, "ag-kill")
    with Collector(gw, tmp_path) as sub:
        proc = agent_run(state, "--interval", "0.02", "--count", "300")
        wait_for(lambda: len(sub.seqs("ag-kill")) >= 50, timeout=60)
        proc.send_signal(signal.SIGKILL)
        finish(proc, timeout=10)
        rc, output = finish(agent_run(state, "--interval", "0.02", "--count", "300"))
        assert rc == 0, output
        wait_for(lambda: sub.has_all("ag-kill", 300), timeout=30)


def test_token_counts_and_failures_are_one_line(gw: GatewayProcess, tmp_path: Path) -> None:
    state = tmp_path / "agent"
    enroll_agent(gw, state, "ag-tok")
    token = run_cli("gatepass-agent", "token", "--state", str(state)).stdout.strip()
    assert token.count(".") == 2
    # Wrong secret.
    gw.add_device("ag-wrong")
    bad = agent_enroll(gw.https_url, gw.ca, "ag-wrong", "nope", tmp_path / "wrong", check=False)
    _one_line_failure(bad, "secret")
    assert not (tmp_path / "wrong" / "agent.json").exists()
    # Wrong CA (the gateway's server certificate does not chain to it).
    other = tmp_path / "other-ca.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(tmp_path / "o.key"),
            "-out",
            str(other),
            "-subj",
            "/CN=other",
            "-days",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    secret = gw.add_device("ag-ca")
    bad = agent_enroll(gw.https_url, other, "ag-ca", secret, tmp_path / "ca", check=False)
    _one_line_failure(bad, "not trusted")
    # Unreachable gateway.
    unreachable = "https://127.0.0.1:1"
    bad = agent_enroll(unreachable, gw.ca, "ag-ca", secret, tmp_path / "unreach", check=False)
    _one_line_failure(bad, "connection refused")
    # Corrupt state directory.
    (state / "agent.json").write_text("{not json")
    bad = run_cli("gatepass-agent", "token", "--state", str(state), check=False)
    _one_line_failure(bad, "corrupt")


def _one_line_failure(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in lines[0].lower(), lines[0]


def test_short_token_lifetime_refreshes_without_loss(tmp_path: Path) -> None:
    root = init_gateway(tmp_path / "gw", "token_lifetime = 10", "token_burst = 50")
    with running_gateway(root) as gw:
        state = tmp_path / "agent"
        enroll_agent(gw, state, "ag-churn")
        with Collector(gw, tmp_path) as sub:
            rc, output = finish(agent_run(state, "--interval", "0.1", "--count", "600"), 120)
            assert rc == 0, output
            wait_for(lambda: sub.has_all("ag-churn", 600), timeout=30)
        status = json.loads(
            run_cli("gatepass-agent", "status", "--state", str(state), "--json").stdout
        )
        assert status["outbox_depth"] == 0
        assert status["connects"] >= 5  # a 10 s token over 60 s: several reconnects


def test_certificate_renewed_during_a_run_without_a_gap(tmp_path: Path) -> None:
    # 43 s certificates: the agent renews about 29 s after enrollment, mid-run.
    root = init_gateway(tmp_path / "gw", "cert_validity_days = 0.0005", "token_burst = 50")
    with running_gateway(root) as gw:
        state = tmp_path / "agent"
        enroll_agent(gw, state, "ag-renew")
        first_serial = (state / "identity").resolve().name
        with Collector(gw, tmp_path) as sub:
            rc, output = finish(agent_run(state, "--interval", "0.1", "--count", "400"), 120)
            assert rc == 0, output
            wait_for(lambda: sub.has_all("ag-renew", 400), timeout=30)
        status = json.loads(
            run_cli("gatepass-agent", "status", "--state", str(state), "--json").stdout
        )
        assert status["cert_renewals"] >= 1
        assert (state / "identity").resolve().name != first_serial
        assert len(list((state / "ids").iterdir())) == 1  # the old key is gone


def test_gateway_killed_and_restarted_loses_nothing(tmp_path: Path) -> None:
    root = init_gateway(tmp_path / "gw", "token_burst = 50")
    gw = start_gateway(root)
    try:
        state = tmp_path / "agent"
        enroll_agent(gw, state, "ag-crash")
        with Collector(gw, tmp_path) as sub:
            proc = agent_run(state, "--interval", "0.02", "--count", "400")
            wait_for(lambda: len(sub.seqs("ag-crash")) >= 80, timeout=60)
            gw.stop(signal.SIGKILL)
            gw = start_gateway(root, https_port=gw.https_port, mqtt_port=gw.mqtt_port)
            rc, output = finish(proc, timeout=120)
            assert rc == 0, output
            wait_for(lambda: sub.has_all("ag-crash", 400), timeout=60)
    finally:
        gw.stop(signal.SIGKILL)


def test_commands_reach_the_configured_program(gw: GatewayProcess, tmp_path: Path) -> None:
    state = tmp_path / "agent"
    enroll_agent(gw, state, "ag-cmd")
    operator = _device_with_acl(gw, tmp_path, "operator", "--pub", "devices/+/commands/#")
    out = tmp_path / "commands.txt"
    proc = agent_run(state, "--interval", "1", "--command", f"sh -c 'cat >> {out}'")
    try:
        wait_for(lambda: _status(state).get("connects", 0) >= 1, timeout=30)
        assert pub(gw, operator, "devices/ag-cmd/commands/reboot", "now").returncode == 0
        wait_for(lambda: out.exists() and out.read_text() == "now", timeout=20)
    finally:
        proc.terminate()
        rc, output = finish(proc, timeout=30)
    assert rc == 0, output


def _device_with_acl(gw: GatewayProcess, tmp: Path, name: str, *acl: str) -> Device:
    key, cert, _ = register_and_enroll(gw, tmp / name, name, *acl)
    return Device(name, key, cert)


def _status(state: Path) -> dict[str, int]:
    path = state / "status.json"
    try:
        data: dict[str, int] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data
