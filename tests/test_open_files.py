"""The gateway raises its open-file limit to fit `max_connections` (pure and real)."""

from __future__ import annotations

import resource
import socket
import time
from pathlib import Path

import pytest

from gateway.open_files import RESERVED_FILES, open_file_budget
from tests.gatewayproc import init_gateway, running_gateway, start_gateway
from tests.test_est_http import curl

INF = resource.RLIM_INFINITY


@pytest.mark.parametrize(
    ("soft", "hard", "connections", "expected_soft", "warns"),
    [
        (1024, 524288, 20000, 20000 + RESERVED_FILES, False),  # systemd's default limits
        (1024, 4096, 20000, 4096, True),  # hard limit too low: as far as it goes, and say so
        (4096, 4096, 20000, 4096, True),  # nothing to raise, still too low
        (65536, 524288, 20000, 65536, False),  # never lowered
        (1024, INF, 100, 100 + RESERVED_FILES, False),
        (INF, INF, 20000, INF, False),
    ],
)
def test_open_file_budget(
    soft: int, hard: int, connections: int, expected_soft: int, warns: bool
) -> None:
    budget = open_file_budget(soft, hard, connections)
    assert budget.soft == expected_soft
    assert (budget.warning is not None) == warns
    if warns:
        assert budget.warning is not None and "LimitNOFILE" in budget.warning


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


def test_serve_raises_a_low_soft_limit(tmp_path: Path) -> None:
    root = init_gateway(tmp_path / "gw", "max_connections = 300")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the gateway
    try:
        gw = start_gateway(root)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        wanted = 300 + RESERVED_FILES
        expected = wanted if hard == INF else min(wanted, hard)
        assert _soft_nofile(gw.proc.pid) == expected
        assert ("open-file limit" in gw.log()) == (expected < wanted)
    finally:
        gw.stop()


@pytest.mark.parametrize("listener", ["https", "mqtt"])
def test_a_silent_client_is_dropped_after_the_handshake_timeout(
    tmp_path: Path, listener: str
) -> None:
    root = init_gateway(tmp_path / "gw", "tls_handshake_timeout = 1.0")
    with running_gateway(root) as gw:
        port = gw.https_port if listener == "https" else gw.mqtt_port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the gateway, no TLS byte sent
            waited = time.monotonic() - started
        assert 0.5 <= waited < 5, waited  # asyncio's own default would be 60 s
        assert curl(gw, "/healthz")[0] == 200  # and everyone else is still served
