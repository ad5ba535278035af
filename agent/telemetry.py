"""Telemetry readings of the machine the agent runs on.

Owns: reading load, memory and CPU temperature from `/proc` and `/sys/class/thermal`
where they exist, and the JSON payload of one reading. Must not: publish anything.
Every reader returns None where the machine does not offer the value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["reading_payload"]

PROC = Path("/proc")
THERMAL = Path("/sys/class/thermal")


def load_average(proc: Path = PROC) -> float | None:
    try:
        return float((proc / "loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def memory_available_kb(proc: Path = PROC) -> int | None:
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_temperature_c(thermal: Path = THERMAL) -> float | None:
    try:
        return int((thermal / "thermal_zone0" / "temp").read_text().strip()) / 1000.0
    except (OSError, ValueError):
        return None


def reading_payload(device_id: str, seq: int, ts: float, *, host: bool = True) -> bytes:
    """One reading: `device_id`, `seq` and `ts` (Unix seconds), and with `host` this
    host's load, available memory and CPU temperature where it can read them."""
    body: dict[str, Any] = {"device_id": device_id, "seq": seq, "ts": round(ts, 3)}
    if host:
        extras = {
            "load": load_average(),
            "mem_available_kb": memory_available_kb(),
            "cpu_temp_c": cpu_temperature_c(),
        }
        body.update({k: v for k, v in extras.items() if v is not None})
    return json.dumps(body, separators=(",", ":")).encode()
