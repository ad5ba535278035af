"""What the HTTP benches (`bench/enroll.py`, `bench/token.py`) share about the gateway.

Owns: the environment that lifts the gateway's rate limits out of reach (the benches
measure capacity, not the limits), reading a process's own CPU time from /proc, and
stopping the bench's gateway (drain, then kill).
Must not: measure or report anything itself; import from the bench scripts (they put
the repository root on the import path before importing this module).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.gatewayproc import GatewayProcess

__all__ = ["UNLIMITED_ENV", "server_cpu_seconds", "stop_gateway"]

UNLIMITED_ENV = {
    "GATEPASS_TOKEN_RATE_PER_MINUTE": "1000000000",
    "GATEPASS_TOKEN_BURST": "1000000000",
    "GATEPASS_FAILURE_RATE_PER_MINUTE": "1000000000",
    "GATEPASS_FAILURE_BURST": "1000000000",
}


def server_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` (all its threads), or None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_gateway(gw: GatewayProcess) -> None:
    """SIGTERM (the gateway drains and exits), SIGKILL if it has not within 10 s."""
    try:
        gw.stop(timeout=10)
    except subprocess.TimeoutExpired:
        gw.proc.kill()
        gw.proc.wait(timeout=10)
