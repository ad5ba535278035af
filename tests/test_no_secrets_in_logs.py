"""Secrets, tokens and private keys never reach a log, even at DEBUG level.

A real gateway and a real agent, both logging at DEBUG, go through enrollment (and a
wrong secret), token refreshes, MQTT publishing, a token printed for mosquitto_pub and a
refused CONNECT; then every log, and the agent's status file, is searched for each
secret that passed through them.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.gatewayproc import (
    agent_enroll,
    cli,
    init_gateway,
    run_cli,
    start_gateway,
)
from tests.test_gateway_mqtt import Device, pub

pytestmark = pytest.mark.timeout(180)

# A whole compact JWS: header, payload and signature (a prefix for correlation is fine).
AGENT_RUN = ("--log-level", "DEBUG", "--interval", "0.05", "--count", "60")
WHOLE_JWT = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]{40,}")


def _key_body(pem: Path) -> list[str]:
    """The base64 lines of a PEM private key (each alone would give it away)."""
    return [line for line in pem.read_text().splitlines() if line and not line.startswith("-")]


def _audit_log(database: Path) -> str:
    with contextlib.closing(sqlite3.connect(database)) as conn:
        rows = conn.execute("SELECT * FROM audit ORDER BY id").fetchall()
    return "\n".join("|".join(str(v) for v in row) for row in rows)


def test_nothing_secret_in_any_log(tmp_path: Path) -> None:
    root = init_gateway(tmp_path / "gw", "token_lifetime = 10", "token_burst = 50")
    gw = start_gateway(root, log_level="DEBUG")
    try:
        secret = gw.add_device("leak-1")
        wrong = "gpe_" + "W" * 32
        refused = agent_enroll(gw.https_url, gw.ca, "leak-1", wrong, tmp_path / "x", check=False)
        assert refused.returncode != 0
        state = tmp_path / "agent"
        agent_enroll(gw.https_url, gw.ca, "leak-1", secret, state)
        run = subprocess.run(
            [cli("gatepass-agent"), "run", "--state", str(state), *AGENT_RUN],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        token = run_cli("gatepass-agent", "token", "--state", str(state)).stdout.strip()
        assert WHOLE_JWT.fullmatch(token)
        device = Device(
            "leak-1", state / "identity" / "device.key", state / "identity" / "device.pem"
        )
        assert pub(gw, device, "devices/leak-1/telemetry", "{}", token=token).returncode == 0
        forged = token[:-8] + ("A" * 8 if not token.endswith("A" * 8) else "B" * 8)
        assert pub(gw, device, "devices/leak-1/telemetry", "{}", token=forged).returncode != 0
    finally:
        gw.stop()

    logs = {
        "gateway log": gw.log(),
        "agent output": run.stdout + run.stderr,
        "agent status file": (state / "status.json").read_text(),
        "audit log": _audit_log(root / "gateway.db"),
    }
    assert "refused|wrong secret" in logs["audit log"]  # the refusal is told, not its secret
    assert "CONNECT refused: client id 'leak-1'" in logs["gateway log"]  # and the bad token
    secrets = {
        "enrollment secret": secret.removeprefix("gpe_"),
        "wrong secret": wrong.removeprefix("gpe_"),
        "token": token,
        "forged token": forged,
        **{f"key line {i}": line for i, line in enumerate(_key_body(device.key))},
    }
    for where, text in logs.items():
        for what, value in secrets.items():
            assert value not in text, f"{what} in the {where}"
        assert not WHOLE_JWT.search(text), f"a whole token in the {where}"
