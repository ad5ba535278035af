"""MQTT through a real gateway process: tokens from the token endpoint, mosquitto clients."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gatewayproc import GatewayProcess, init_gateway, running_gateway, wait_for
from tests.test_est_http import enroll_ok, register_and_enroll
from tests.test_token_http import get_token

pytestmark = pytest.mark.timeout(180)


@dataclass
class Device:
    name: str
    key: Path
    cert: Path

    def token(self, gw: GatewayProcess) -> str:
        status, body, _ = get_token(gw, self.cert, self.key)
        assert status == 200, body
        return str(body["access_token"])


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    root = init_gateway(tmp_path_factory.mktemp("mq") / "gw", "token_burst = 50")
    with running_gateway(root) as gateway:
        yield gateway


def device(gw: GatewayProcess, tmp: Path, name: str) -> Device:
    folder = tmp / name
    folder.mkdir()
    key, cert = enroll_ok(gw, folder, name)
    return Device(name, key, cert)


def tls_args(
    gw: GatewayProcess, dev: Device, token: str | None = None, user: str | None = None
) -> list[str]:
    return [
        "-h",
        "127.0.0.1",
        "-p",
        str(gw.mqtt_port),
        "--cafile",
        str(gw.ca),
        "--cert",
        str(dev.cert),
        "--key",
        str(dev.key),
        "-i",
        dev.name,
        "-u",
        user or dev.name,
        "-P",
        token or dev.token(gw),
        "-V",
        "mqttv311",
    ]


class Subscriber:
    """`mosquitto_sub -d` with its output read line by line in a thread (never blocks a test)."""

    def __init__(self, args: list[str]) -> None:
        # stdbuf: mosquitto_sub block-buffers its output when it goes to a pipe.
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "mosquitto_sub", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, needle: str, timeout: float = 20) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if needle in line), None)

        return wait_for(found, timeout=timeout)

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@contextlib.contextmanager
def subscriber(
    gw: GatewayProcess, dev: Device, topic: str, token: str | None = None
) -> Iterator[Subscriber]:
    sub = Subscriber([*tls_args(gw, dev, token), "-t", topic, "-q", "1", "-v", "-d"])
    try:
        yield sub
    finally:
        sub.close()


def pub(
    gw: GatewayProcess, dev: Device, topic: str, message: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mosquitto_pub", *tls_args(gw, dev, token), "-t", topic, "-m", message, "-q", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(scope="module")
def fleet(gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Device]:
    tmp = tmp_path_factory.mktemp("fleet")
    devices = {name: device(gw, tmp, name) for name in ("mq-a", "mq-b", "mq-c", "mq-d")}
    # A backend: a device with wider filters.
    key, cert, _ = register_and_enroll(
        gw,
        tmp / "backend",
        "backend",
        "--sub",
        "devices/+/telemetry",
        "--pub",
        "devices/+/commands/#",
    )
    devices["backend"] = Device("backend", key, cert)
    return devices


def test_allowed_publish_is_delivered_and_foreign_topic_refused(
    gw: GatewayProcess, fleet: dict[str, Device]
) -> None:
    backend, a = fleet["backend"], fleet["mq-a"]
    with subscriber(gw, backend, "devices/+/telemetry") as sub:
        assert sub.wait_line("Subscribed (mid").endswith(": 1")
        # Another device's topic: refused, never delivered (the gateway disconnects the client).
        pub(gw, a, "devices/mq-b/telemetry", "forged")
        assert pub(gw, a, "devices/mq-a/telemetry", "hello").returncode == 0
        sub.wait_line("devices/mq-a/telemetry hello")
        assert not any("forged" in line for line in sub.lines)


def test_subscribe_to_other_device_gets_0x80(gw: GatewayProcess, fleet: dict[str, Device]) -> None:
    with subscriber(gw, fleet["mq-a"], "devices/mq-b/commands/#") as sub:
        assert sub.wait_line("Subscribed (mid").endswith(": 128")


def test_token_of_another_device_or_bad_token_gets_connack_5(
    gw: GatewayProcess, fleet: dict[str, Device]
) -> None:
    a, b = fleet["mq-a"], fleet["mq-b"]
    stolen = a.token(gw)
    # A's token presented with B's certificate, as A and as B.
    for user in ("mq-a", "mq-b"):
        args = tls_args(gw, b, stolen, user=user)
        args[args.index("-i") + 1] = user
        result = subprocess.run(
            ["mosquitto_pub", *args, "-t", f"devices/{user}/x", "-m", "1"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode != 0
        assert "not authorised" in (result.stderr + result.stdout).lower()
    forged = stolen[:-4] + ("AAAA" if not stolen.endswith("AAAA") else "BBBB")
    result = pub(gw, a, "devices/mq-a/x", "1", token=forged)
    assert result.returncode != 0 and "not authorised" in (result.stderr + result.stdout).lower()


def test_revoked_device_session_closed_within_a_second(
    gw: GatewayProcess, fleet: dict[str, Device]
) -> None:
    with subscriber(gw, fleet["mq-c"], "devices/mq-c/commands/#") as sub:
        sub.wait_line("Subscribed (mid")
        gw.admin("device", "revoke", "mq-c")
        revoked_at = time.monotonic()
        wait_for(lambda: _closed_after(sub), timeout=10)
        assert time.monotonic() - revoked_at <= 1.5  # 1 s budget plus process exit


def _closed_after(sub: Subscriber) -> bool:
    return sub.exited() or any(
        "Connection" in line and "lost" in line.lower() for line in sub.lines
    )


def test_retired_key_ends_its_sessions(gw: GatewayProcess, fleet: dict[str, Device]) -> None:
    d = fleet["mq-d"]
    token = d.token(gw)
    with subscriber(gw, d, "devices/mq-d/commands/#", token=token) as sub:
        sub.wait_line("Subscribed (mid")
        kid = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"]
        gw.admin("keys", "retire", kid, "--now")
        retired_at = time.monotonic()
        wait_for(lambda: _closed_after(sub), timeout=10)
        assert time.monotonic() - retired_at <= 1.5
    # The old token no longer opens a session; a fresh one (new key) does.
    assert pub(gw, d, "devices/mq-d/x", "1", token=token).returncode != 0
    assert pub(gw, d, "devices/mq-d/x", "1").returncode == 0


def test_session_closed_at_token_expiry(tmp_path: Path) -> None:
    root = init_gateway(tmp_path / "gw", "token_lifetime = 5")
    with running_gateway(root) as gw:
        dev = device(gw, tmp_path, "mq-exp")
        token = dev.token(gw)
        with subscriber(gw, dev, "devices/mq-exp/commands/#", token=token) as sub:
            sub.wait_line("Subscribed (mid")
            started = time.monotonic()
            wait_for(lambda: _closed_after(sub), timeout=15)
            assert 2 <= time.monotonic() - started <= 7
        # The expired token cannot connect again.
        assert pub(gw, dev, "devices/mq-exp/x", "1", token=token).returncode != 0
