"""Test helpers: a real `gatepass-gateway` as a subprocess, and real client tools.

Every helper waits on a condition with a deadline; none sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

BIN = Path(sys.executable).parent


def cli(name: str) -> str:
    return str(BIN / name)


def run_cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [cli(args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return proc


def agent_enroll(
    gateway_url: str,
    ca: Path,
    device_id: str,
    secret: str,
    state: Path,
    *extra: str,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`gatepass-agent enroll` exactly as the SPEC spells it, plus `extra` flags."""
    return run_cli(
        "gatepass-agent",
        "enroll",
        "--gateway",
        gateway_url,
        "--ca",
        str(ca),
        "--device-id",
        device_id,
        "--secret",
        secret,
        "--state",
        str(state),
        *extra,
        check=check,
    )


def wait_for(condition: Callable[[], T | None], timeout: float = 15.0, interval: float = 0.02) -> T:
    """Poll `condition` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


@dataclass
class GatewayProcess:
    root: Path
    proc: subprocess.Popen[bytes]
    https_url: str
    mqtt_port: int
    log_path: Path

    @property
    def https_port(self) -> int:
        return int(self.https_url.rsplit(":", 1)[1])

    @property
    def ca(self) -> Path:
        return self.root / "pki" / "ca.pem"

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli("gatepass-gateway", *args, "--dir", str(self.root), check=check)

    def add_device(self, device_id: str, *extra: str) -> str:
        out = self.admin("device", "add", device_id, *extra, "--json")
        secret: str = json.loads(out.stdout)["secret"]
        return secret

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def init_gateway(root: Path, *config_lines: str) -> Path:
    run_cli("gatepass-gateway", "init", "--dir", str(root))
    if config_lines:
        config = root / "gateway.toml"
        text = config.read_text()
        for line in config_lines:
            key = line.split("=", 1)[0].strip()
            lines = [x for x in text.splitlines() if not x.startswith(f"{key} =")]
            text = "\n".join([*lines, line]) + "\n"
        config.write_text(text)
    return root


def start_gateway(
    root: Path,
    env: dict[str, str] | None = None,
    https_port: int = 0,
    mqtt_port: int = 0,
    log_level: str = "INFO",
) -> GatewayProcess:
    endpoints = root / "run" / "endpoints.json"
    endpoints.unlink(missing_ok=True)
    log_path = root / f"serve-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:  # the child keeps its own descriptor
        proc = _popen_gateway(root, log, env, https_port, mqtt_port, log_level)

    def ready() -> dict[str, Any] | None:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited {proc.returncode}: {log_path.read_text()}")
        if not endpoints.exists():
            return None
        data: dict[str, Any] = json.loads(endpoints.read_text())
        return data if data.get("pid") == proc.pid else None

    data = wait_for(ready, timeout=30)
    mqtt_port = int(data["mqtt"].rsplit(":", 1)[1])
    return GatewayProcess(root, proc, data["https"], mqtt_port, log_path)


def _popen_gateway(
    root: Path,
    log: Any,
    env: dict[str, str] | None,
    https_port: int,
    mqtt_port: int,
    log_level: str = "INFO",
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            cli("gatepass-gateway"),
            "serve",
            "--dir",
            str(root),
            "--https-port",
            str(https_port),
            "--mqtt-port",
            str(mqtt_port),
            "--log-level",
            log_level,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


@contextlib.contextmanager
def running_gateway(root: Path, env: dict[str, str] | None = None) -> Iterator[GatewayProcess]:
    gw = start_gateway(root, env)
    try:
        yield gw
    finally:
        if gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait(timeout=10)
