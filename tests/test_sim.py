"""`gatepass-sim run` end to end: real gateway subprocess, real agents, real TLS.

Each scenario's promise is asserted at about 20 devices; a sabotage run (the verifying
subscriber's backend device is revoked mid-run, so the gateway stops delivering to it)
must make the simulator exit non-zero with the losses counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gatewayproc import cli, init_gateway, run_cli, start_gateway, wait_for

pytestmark = pytest.mark.timeout(90)


def sim(*args: str, timeout: float = 80) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cli("gatepass-sim"), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def report_of(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def assert_nothing_lost(r: dict[str, Any], devices: int) -> None:
    assert r["devices"] == {"requested": devices, "enrolled": devices, "connected": devices}
    m = r["messages"]
    assert m["sent"] > 0
    assert m["sent"] == m["acked"] == m["delivered"], m
    assert m["lost"] == 0
    assert r["attacks"] == {"attempted": 0, "refused": 0, "by_kind": {}}
    assert r["ok"] and r["failures"] == []


def test_steady_20_devices(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    html = tmp_path / "r.html"
    proc = sim("run", "--devices", "20", "--duration", "5", "--json", str(out), "--html", str(html))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = report_of(out)
    assert_nothing_lost(r, 20)
    assert r["messages"]["sent"] >= 20 * 4
    for kind in ("enroll", "token", "connect", "puback", "delivery"):
        s = r["latency_ms"][kind]
        assert set(s) >= {"p50", "p95", "p99", "max"}
        assert 0 < s["p50"] <= s["p95"] <= s["p99"] <= s["max"], (kind, s)
    assert r["latency_ms"]["enroll"]["count"] == 20
    assert {"python", "platform", "cpu_count"} <= set(r["environment"])
    assert sum(row["delivered"] for row in r["throughput"]) == r["messages"]["delivered"]
    assert "gateway" in r["resources"]
    page = html.read_text()
    assert page.count("<svg") >= 6
    for fetch in ("<script", "<link", "src=", "href=", "url("):
        assert fetch not in page
    assert "OK" in proc.stdout


def test_storm_everyone_reconnects_nothing_lost(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = sim(
        "run",
        "--devices",
        "20",
        "--duration",
        "6",
        "--interval",
        "0.5",
        "--scenario",
        "storm",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = report_of(out)
    assert_nothing_lost(r, 20)
    storm = r["scenario"]
    assert storm["devices"] == storm["reconnected"] == 20
    assert storm["all_reconnected_s"] is not None
    assert r["latency_ms"]["reconnect"]["count"] >= 20


def test_churn_refreshes_and_reconnects_nothing_lost(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = sim(
        "run",
        "--devices",
        "20",
        "--duration",
        "14",
        "--interval",
        "0.5",
        "--scenario",
        "churn",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = report_of(out)
    assert_nothing_lost(r, 20)
    churn = r["scenario"]
    assert churn["token_lifetime_s"] == 6
    assert churn["token_refreshes"]["min"] >= 2
    assert churn["reconnects"]["min"] >= 2
    # Every reconnect with a new token resumes the device's TLS session (the first
    # connect of each device is a full handshake, and so is one after a failure).
    tls = r["mqtt_tls"]
    assert tls["handshakes"] >= 20 * 3
    assert tls["resumed"] >= tls["handshakes"] - 20 - sum(r["errors"].values())


@pytest.fixture
def gateway_dir(tmp_path: Path) -> Iterator[Path]:
    root = init_gateway(tmp_path / "gw")
    gw = start_gateway(
        root, env={"GATEPASS_TOKEN_RATE_PER_MINUTE": "600", "GATEPASS_TOKEN_BURST": "50"}
    )
    try:
        yield root
    finally:
        gw.stop()


def test_sabotage_revoked_subscriber_makes_the_run_fail(gateway_dir: Path, tmp_path: Path) -> None:
    """Revoke the verifier's backend device mid-run: the gateway closes its session and
    delivers nothing more to it, while devices keep getting PUBACKs. The simulator must
    notice the acknowledged-but-undelivered messages and exit 1."""
    out = tmp_path / "r.json"
    argv = [cli("gatepass-sim"), "run", "--gateway-dir", str(gateway_dir), "--devices", "5",
            "--duration", "6", "--interval", "0.25", "--delivery-timeout", "3",
            "--json", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
        reader.start()
        # The token phase starts once the verifier is subscribed; steady publishing follows.
        wait_for(lambda: any(line.startswith("token") for line in lines), timeout=40)
        listing = run_cli("gatepass-gateway", "device", "list", "--dir", str(gateway_dir),
                          "--json")  # fmt: skip
        ids = [d["device_id"] for d in json.loads(listing.stdout)]
        (verifier,) = [i for i in ids if i.endswith("-verifier")]
        run_cli("gatepass-gateway", "device", "revoke", verifier, "--dir", str(gateway_dir))
        assert proc.wait(timeout=60) == 1, "".join(lines)
        reader.join(timeout=5)
    r = report_of(out)
    m = r["messages"]
    assert m["sent"] == m["acked"] > m["delivered"]
    assert m["lost"] == m["lost_after_ack"] == m["sent"] - m["delivered"] > 0
    assert not r["ok"]
    assert any("lost" in f for f in r["failures"])
    assert any(line.startswith("FAIL") for line in lines)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--devices", "0"], "--devices"),
        (["--scenario", "nope"], "unknown scenario"),
        (["--duration", "-1"], "--duration"),
        (["--token-lifetime", "2"], "--token-lifetime"),
        (["--gateway-dir", "/nonexistent/gw"], "not a gateway state directory"),
        (["--devices", "many"], "invalid int value"),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], needle: str) -> None:
    proc = sim("run", *args, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert proc.stderr.startswith("gatepass-sim: error:")
