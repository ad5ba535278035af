"""The gateway a simulation runs against: an embedded subprocess, or one already running.

Owns: starting `gatepass-gateway` as a child process in a state directory (init, the
settings a load test needs passed as `GATEPASS_*` environment variables, `serve` on
ports 0, waiting for `run/endpoints.json` with a deadline), stopping it (SIGTERM, then
SIGKILL), killing and restarting it on the same ports (for chaos scenarios), finding the
endpoints of a gateway started by someone else (`--gateway-dir`), and registering,
revoking and administering devices through the gateway's own registry and CLI (the
running gateway reads the registry on every request).
Must not: enroll, connect or measure devices (`simulator.fleet` does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from gateway.config import load_settings
from gateway.enrollment_secrets import hash_secret, new_secret
from gateway.registry import Registry
from gateway.statedir import StateDir
from shared.acl import AclRule

__all__ = [
    "LOAD_TEST_SETTINGS",
    "Endpoints",
    "Gateway",
    "GatewayError",
    "embedded_gateway",
    "existing_gateway",
]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05

LOAD_TEST_SETTINGS: Mapping[str, str] = {
    # One simulator host stands for a whole fleet: per-device and per-address limits
    # meant for real devices would throttle it. Scenarios may override any of these.
    "GATEPASS_TOKEN_RATE_PER_MINUTE": "600",
    "GATEPASS_TOKEN_BURST": "50",
    "GATEPASS_FAILURE_RATE_PER_MINUTE": "6000",
    "GATEPASS_FAILURE_BURST": "1000",
    "GATEPASS_MAX_CONNECTIONS": "50000",
}


class GatewayError(Exception):
    """The gateway could not be started, found or administered (one line for people)."""


@dataclass(frozen=True, slots=True)
class Endpoints:
    https: str
    mqtt: str
    pid: int

    @property
    def https_port(self) -> int:
        return urlsplit(self.https).port or 443

    @property
    def mqtt_port(self) -> int:
        return urlsplit(self.mqtt).port or 8883

    @classmethod
    def read(cls, path: Path) -> Endpoints:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            return cls(str(data["https"]), str(data["mqtt"]), int(data["pid"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GatewayError(f"{path}: no usable endpoints ({exc})") from exc


def _gateway_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


class Gateway:
    """A gateway state directory, its endpoints and (when embedded) its process."""

    def __init__(self, root: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.state = StateDir(root)
        self.env = dict(env or {})
        self.endpoints: Endpoints | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self.restarts = 0

    @property
    def root(self) -> Path:
        return self.state.root

    @property
    def embedded(self) -> bool:
        return self._proc is not None

    @property
    def pid(self) -> int | None:
        return None if self.endpoints is None else self.endpoints.pid

    @property
    def ca_file(self) -> Path:
        return self.state.ca_cert

    @property
    def log_path(self) -> Path | None:
        return self._log

    def require_endpoints(self) -> Endpoints:
        if self.endpoints is None:
            raise GatewayError("the gateway is not running")
        return self.endpoints

    # -- process lifecycle (embedded only) ----------------------------------------------

    def start(self, https_port: int = 0, mqtt_port: int = 0) -> Endpoints:
        """Run `serve` and wait until both listeners accept connections."""
        if self._proc is not None and self._proc.poll() is None:
            raise GatewayError("the embedded gateway is already running")
        self.state.endpoints.unlink(missing_ok=True)
        self._log = self.root / f"serve-{len(list(self.root.glob('serve-*.log')))}.log"
        with self._log.open("wb") as log:  # the child keeps its own descriptor
            self._proc = self._spawn(log, https_port, mqtt_port)
        self.endpoints = self._wait_ready(self._proc)
        return self.endpoints

    def _spawn(self, log: IO[bytes], https_port: int, mqtt_port: int) -> subprocess.Popen[bytes]:
        argv = _gateway_argv(
            "serve",
            "--dir",
            str(self.root),
            "--https-port",
            str(https_port),
            "--mqtt-port",
            str(mqtt_port),
            "--log-level",
            "WARNING",
        )
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> Endpoints:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise GatewayError(f"the gateway exited with {proc.returncode}: {self._tail()}")
            if self.state.endpoints.exists():
                endpoints = Endpoints.read(self.state.endpoints)
                if endpoints.pid == proc.pid:
                    return endpoints
            time.sleep(POLL_S)
        self.kill()
        raise GatewayError(f"the gateway was not ready within {START_TIMEOUT_S:.0f} s")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code (None if not ours)."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL at once: the crash a chaos scenario wants."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def restart(self, *, crash: bool = False) -> Endpoints:
        """Stop (or kill) the embedded gateway and start it again on the same ports."""
        endpoints = self.require_endpoints()
        if self._proc is None:
            raise GatewayError("only an embedded gateway can be restarted")
        if crash:
            self.kill()
        else:
            self.stop()
        self.restarts += 1
        return self.start(endpoints.https_port, endpoints.mqtt_port)

    def _tail(self, chars: int = 600) -> str:
        if self._log is None or not self._log.exists():
            return ""
        return self._log.read_text(errors="replace")[-chars:].strip()

    # -- administration -------------------------------------------------------------------

    def register(self, device_ids: Sequence[str], rules: Sequence[AclRule]) -> dict[str, str]:
        """Register devices straight in the registry; returns their one-time secrets."""
        settings = load_settings(self.state.config)
        secrets: dict[str, str] = {}
        with Registry.open(self.state.database) as registry:
            now = time.time()
            expires = now + settings.enrollment_secret_ttl
            for device_id in device_ids:
                secret = new_secret()
                registry.add_device(device_id, rules, hash_secret(secret), expires, now)
                secrets[device_id] = secret
            registry.audit(
                "device_add", "ok", now, source="simulator", detail=f"{len(device_ids)} devices"
            )
        return secrets

    def revoke(self, device_ids: Iterable[str]) -> None:
        with Registry.open(self.state.database) as registry:
            now = time.time()
            for device_id in device_ids:
                registry.revoke_device(device_id, now, source="simulator")

    def admin(self, *args: str, timeout: float = 60.0) -> str:
        """Run a `gatepass-gateway` administration command on this directory."""
        proc = subprocess.run(
            _gateway_argv(*args, "--dir", str(self.root)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **self.env},
        )
        if proc.returncode != 0:
            raise GatewayError(f"gatepass-gateway {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout


def embedded_gateway(root: Path, env: Mapping[str, str]) -> Gateway:
    """Initialise a fresh state directory and start `serve` in it on free ports."""
    proc = subprocess.run(
        _gateway_argv("init", "--dir", str(root)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise GatewayError(f"gatepass-gateway init: {proc.stderr.strip()}")
    gateway = Gateway(root, env={**LOAD_TEST_SETTINGS, **env})
    gateway.start()
    return gateway


def existing_gateway(root: Path) -> Gateway:
    """A gateway someone else runs: its directory must hold live endpoints."""
    state = StateDir(root)
    if not state.config.is_file() or not state.database.is_file():
        raise GatewayError(f"{root}: not a gateway state directory")
    if not state.endpoints.exists():
        raise GatewayError(f"{root}: the gateway is not running (no run/endpoints.json)")
    endpoints = Endpoints.read(state.endpoints)
    if not _alive(endpoints.pid):
        raise GatewayError(f"{root}: the gateway (pid {endpoints.pid}) is not running")
    gateway = Gateway(root)
    gateway.endpoints = endpoints
    return gateway


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
