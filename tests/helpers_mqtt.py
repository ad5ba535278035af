"""Test helpers for the MQTT listener: a test PKI, device credentials, tokens, paho clients.

Only tests (and the bench) import this module. Waiting is on conditions with deadlines
(`wait_until`), never fixed sleeps. Each paho client is driven by its own thread
calling `loop()`, with no automatic reconnect, so a test sees exactly what happened.
`BrokerProcess` runs a `SecureBroker` in a child process so that a test can SIGKILL it
(with a session store file when given one, to restart it on the same port and store).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from gateway.authority import create_ca, create_server_certificate, issue_device_certificate
from gateway.tls import client_context, server_context
from shared.claims import AclEntry
from shared.keyset import KeySet, SigningKey
from shared.pki import build_csr, generate_p256_key, private_key_pem, x5t_s256
from shared.tokens import TokenVerifier, mint_access_token, new_access_token_claims

__all__ = [
    "AUDIENCE",
    "ISSUER",
    "BrokerProcess",
    "Device",
    "MqttClient",
    "MqttPki",
    "default_acl",
    "make_pki",
    "wait_until",
]

ISSUER = "https://gatepass.test"
AUDIENCE = "mqtt"
NOT_AUTHORIZED = 135  # paho's v5 reason code for a v3.1.1 CONNACK return code 5


async def wait_until(
    condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll `condition` in the event loop until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def default_acl(device_id: str) -> tuple[AclEntry, ...]:
    """The SPEC's default grant: publish `devices/ID/#`, subscribe `devices/ID/commands/#`."""
    return (
        AclEntry(permission="allow", action="publish", topic=f"devices/{device_id}/#"),
        AclEntry(permission="allow", action="subscribe", topic=f"devices/{device_id}/commands/#"),
    )


@dataclass(frozen=True)
class Device:
    """A device's certificate and key files and its certificate thumbprint."""

    device_id: str
    cert_file: Path
    key_file: Path
    thumbprint: str


@dataclass
class MqttPki:
    """A device CA, a server certificate for 127.0.0.1/localhost, and a signing key."""

    directory: Path
    ca_file: Path
    server_cert: Path
    server_key: Path
    signing_key: SigningKey = field(default_factory=SigningKey.generate)
    _ca: Any = None

    def device(self, device_id: str) -> Device:
        """Issue a client certificate for `device_id` (new key each call)."""
        ca_cert, ca_key = self._ca
        key = generate_p256_key()
        cert = issue_device_certificate(
            build_csr(key, device_id), device_id, ca_cert, ca_key, datetime.now(UTC)
        )
        stem = f"{device_id}-{x5t_s256(cert)[:8]}"
        cert_file = self.directory / f"{stem}.pem"
        key_file = self.directory / f"{stem}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(private_key_pem(key))
        key_file.chmod(0o600)
        return Device(device_id, cert_file, key_file, x5t_s256(cert))

    def server_context(self, *, require_client_cert: bool = True) -> Any:
        return server_context(
            self.server_cert,
            self.server_key,
            self.ca_file,
            require_client_cert=require_client_cert,
        )

    def verifier(self, *keys: SigningKey) -> TokenVerifier:
        return TokenVerifier(
            KeySet.of(*(keys or (self.signing_key,))), issuer=ISSUER, audience=AUDIENCE
        )

    def token(
        self,
        device: Device | str,
        *,
        thumbprint: str | None = None,
        lifetime: int = 300,
        now: float | None = None,
        acl: Iterable[AclEntry] | None = None,
        key: SigningKey | None = None,
        issuer: str = ISSUER,
    ) -> str:
        """A token for `device`, bound to its certificate unless `thumbprint` is given."""
        device_id = device if isinstance(device, str) else device.device_id
        if thumbprint is None:
            assert isinstance(device, Device)
            thumbprint = device.thumbprint
        claims = new_access_token_claims(
            device_id=device_id,
            acl=default_acl(device_id) if acl is None else acl,
            cert_thumbprint=thumbprint,
            issuer=issuer,
            audience=AUDIENCE,
            lifetime=lifetime,
            now=time.time() if now is None else now,
        )
        return mint_access_token(claims, key or self.signing_key)


def make_pki(directory: Path) -> MqttPki:
    """Write a test CA and a server certificate under `directory`."""
    now = datetime.now(UTC)
    ca_cert, ca_key = create_ca(now)
    server_cert, server_key = create_server_certificate(ca_cert, ca_key, ["localhost"], now)
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(private_key_pem(server_key))
    return MqttPki(directory, ca_file, cert_file, key_file, _ca=(ca_cert, ca_key))


class MqttClient:
    """A paho MQTT 3.1.1 client over TLS, driven by its own thread; records what it sees.

    `connack` is paho's reason code value (0 accepted, 135 not authorized); `messages`
    holds (topic, payload, qos, retain, dup); `suback` maps mid -> granted codes;
    `disconnected` is set once the connection is gone.
    """

    def __init__(
        self,
        pki: MqttPki,
        port: int,
        *,
        device: Device | None,
        client_id: str,
        username: str | None = None,
        token: str | None = None,
        clean_session: bool = True,
        keepalive: int = 60,
        will: tuple[str, bytes] | None = None,
        manual_ack: bool = False,
    ) -> None:
        self.port = port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            manual_ack=manual_ack,
        )
        cert = device.cert_file if device else None
        key = device.key_file if device else None
        self.client.tls_set_context(client_context(pki.ca_file, cert, key))
        if username is not None or token is not None:
            self.client.username_pw_set(username, token)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        self.keepalive = keepalive
        self.connack: int | None = None
        self.session_present: bool | None = None
        self.messages: list[tuple[str, bytes, int, bool, bool]] = []
        self.raw_messages: list[paho.MQTTMessage] = []
        self.suback: dict[int, list[int]] = {}
        self.acked: set[int] = set()
        self.error: BaseException | None = None
        self.disconnected = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        self._thread = threading.Thread(target=self._run, daemon=True)

    # callbacks (paho's thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.session_present = bool(flags.session_present)
        self.connack = int(rc.value)

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.raw_messages.append(msg)
            payload = bytes(msg.payload)
            self.messages.append((msg.topic, payload, msg.qos, msg.retain, bool(msg.dup)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.suback[mid] = [int(code.value) for code in codes]

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        self.acked.add(mid)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.disconnected.set()

    def _run(self) -> None:
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        except BaseException as exc:  # recorded for the test to assert on
            self.error = exc
            self.disconnected.set()
            return
        while not self._stop.is_set() and not self.disconnected.is_set():
            self.client.loop(timeout=0.02)

    # test-side API
    def start(self) -> MqttClient:
        # paho writes a packet from the calling thread when it believes no thread runs
        # its loop: publish() from the test's thread then wrote concurrently with this
        # one (packets reordered, now and then a corrupted TLS stream or an abort). Tell
        # paho that this thread runs the loop, as loop_start() would.
        self.client._thread = self._thread
        self._thread.start()
        return self

    async def connected(self, timeout: float = 5.0) -> MqttClient:
        await wait_until(
            lambda: self.connack is not None or self.disconnected.is_set(), timeout, "CONNACK"
        )
        assert self.connack == 0, f"CONNACK {self.connack}, error {self.error!r}"
        return self

    def subscribe(self, topic: str, qos: int = 1) -> int:
        result, mid = self.client.subscribe(topic, qos)
        assert result == paho.MQTT_ERR_SUCCESS and mid is not None
        return mid

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        return int(self.client.publish(topic, payload, qos=qos, retain=retain).mid)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        with self._lock:
            return [m[1] for m in self.messages if topic is None or m[0] == topic]

    def drop(self) -> None:
        """Vanish without DISCONNECT (no FIN handshake either: the socket is shut)."""
        self._stop.set()
        self._thread.join(timeout=5)
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def stop(self) -> None:
        """DISCONNECT (if still connected) and end the thread."""
        if not self.disconnected.is_set() and self.connack == 0:
            self.client.disconnect()
            deadline = time.monotonic() + 2
            while not self.disconnected.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def device_client(
    pki: MqttPki,
    port: int,
    device: Device,
    *,
    token: str | None = None,
    client_id: str | None = None,
    **kwargs: Any,
) -> MqttClient:
    """A started client for `device` with a fresh token of its own unless given."""
    return MqttClient(
        pki,
        port,
        device=device,
        client_id=device.device_id if client_id is None else client_id,
        username=device.device_id,
        token=pki.token(device) if token is None else token,
        **kwargs,
    ).start()


def entries(*rules: Sequence[str]) -> tuple[AclEntry, ...]:
    """ACL entries from (permission, action, topic) triples."""
    return tuple(
        AclEntry(permission=p, action=a, topic=t)  # type: ignore[arg-type]
        for p, a, t in rules
    )


_REPO_ROOT = Path(__file__).resolve().parent.parent
_CHILD_MAIN = (
    "import sys; from tests.helpers_mqtt import serve_in_child; serve_in_child(*sys.argv[1:])"
)


def serve_in_child(directory: str, port: str, store: str = "") -> None:
    """Entry of `BrokerProcess`'s child: a SecureBroker on the PKI in `directory`,
    keeping persistent sessions in the SQLite file `store` if one is named."""
    from gateway.mqtt_broker import SecureBroker
    from gateway.mqtt_sessions import SessionStore

    root = Path(directory)
    keys = KeySet.from_jwks(json.loads((root / "jwks.json").read_text()))

    async def main() -> None:
        context = server_context(
            root / "server.pem", root / "server.key", root / "ca.pem", require_client_cert=True
        )
        verifier = TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE)
        sessions = SessionStore.open(store) if store else None
        async with SecureBroker(
            ssl_context=context, verifier=verifier, port=int(port), session_store=sessions
        ) as broker:
            print(broker.port, flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())


class BrokerProcess:
    """A `SecureBroker` on `pki` in a child process, so that a test can SIGKILL it."""

    def __init__(self, pki: MqttPki, session_store: Path | None = None) -> None:
        self.pki = pki
        self.session_store = session_store
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30.0) -> int:
        """Start the child and return its port once it listens (the same port on restart)."""
        directory = self.pki.directory
        jwks = KeySet.of(self.pki.signing_key).to_jwks()
        (directory / "jwks.json").write_text(json.dumps(jwks))
        with (directory / "broker.log").open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _CHILD_MAIN,
                str(directory),
                str(self.port),
                str(self.session_store or ""),
                cwd=_REPO_ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not line:
            await proc.wait()
            log_text = (directory / "broker.log").read_text()
            raise RuntimeError(f"broker child exited before listening:\n{log_text}")
        self.port = int(line)
        self._proc = proc
        return self.port

    async def kill(self) -> None:
        """SIGKILL the child (no shutdown of any kind) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            await proc.wait()
