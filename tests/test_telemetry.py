"""Telemetry readings (`agent.telemetry.reading_payload`): pure, read from this host."""

from __future__ import annotations

import json
from pathlib import Path

from agent.telemetry import reading_payload


def test_a_reading_has_device_seq_and_time_and_this_hosts_figures() -> None:
    body = json.loads(reading_payload("dev-1", 7, 1_700_000_000.12345))
    assert (body["device_id"], body["seq"], body["ts"]) == ("dev-1", 7, 1_700_000_000.123)
    if Path("/proc/loadavg").exists():  # Linux: the load is always readable
        assert isinstance(body["load"], float)
    if Path("/proc/meminfo").exists():
        assert body["mem_available_kb"] > 0


def test_simulated_devices_leave_the_host_out() -> None:
    body = json.loads(reading_payload("sim-00001", 1, 1_700_000_000.0, host=False))
    assert body == {"device_id": "sim-00001", "seq": 1, "ts": 1_700_000_000.0}
