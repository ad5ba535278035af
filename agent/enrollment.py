"""Enrollment and certificate renewal on the device side (EST client logic).

Owns: generating the P-256 key on the device, the CSR, calling `simpleenroll` once
with the one-time secret or `simplereenroll` with the current certificate, checking
what comes back, and installing it atomically (`agent.identity`). Enrolling again into
an already enrolled state directory for the same device and gateway does nothing.
Must not: schedule renewals (the device loop does) or keep the secret anywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.errors import AgentError, CertificateMismatch, StateError
from agent.gateway_client import GatewayClient
from agent.identity import (
    DeviceIdentity,
    StateLayout,
    install_identity,
    load_identity,
    trust_context,
)
from shared.errors import PkiError
from shared.pki import build_csr, generate_p256_key, load_certificate

__all__ = ["EnrollResult", "enroll", "renew_certificate", "renewal_due"]

RENEW_AT_FRACTION = 2 / 3


@dataclass(frozen=True, slots=True)
class EnrollResult:
    identity: DeviceIdentity
    already_enrolled: bool
    clock_offset: float | None


def enroll(
    state_dir: Path,
    gateway_url: str,
    ca_file: Path,
    device_id: str,
    secret: str,
    mqtt_url: str | None = None,
) -> EnrollResult:
    """Enroll once; a second call for the same device and gateway is a no-op."""
    layout = StateLayout(state_dir)
    existing = _existing(state_dir, device_id, gateway_url)
    if existing is not None:
        return EnrollResult(existing, True, None)
    ca_pem = _read_ca(ca_file)
    client = GatewayClient(gateway_url, trust_context(ca_pem))
    key = generate_p256_key()
    try:
        certs, reply = client.simpleenroll(device_id, secret, build_csr(key, device_id))
        if mqtt_url is None:
            mqtt_url = _advertised_mqtt(client)
    finally:
        client.close()
    leaf = _leaf_for(certs, key)
    install_identity(
        layout,
        key,
        leaf,
        device_id=device_id,
        gateway_url=gateway_url,
        mqtt_url=mqtt_url,
        ca_pem=ca_pem,
    )
    return EnrollResult(load_identity(state_dir), False, reply.clock_offset)


def renew_certificate(identity: DeviceIdentity, client: GatewayClient) -> DeviceIdentity:
    """`simplereenroll` with a new key; the old identity stays until the new one is in."""
    key = generate_p256_key()
    certs = client.simplereenroll(build_csr(key, identity.device_id))
    leaf = _leaf_for(certs, key)
    install_identity(identity.layout, key, leaf, device_id=identity.device_id)
    return load_identity(identity.layout.root)


def renewal_due(identity: DeviceIdentity, now: float) -> float:
    """Seconds until renewal: two thirds into the life left when the certificate arrived."""
    start = max(identity.not_before, min(identity.received_at, identity.not_after))
    return start + (identity.not_after - start) * RENEW_AT_FRACTION - now


def _existing(state_dir: Path, device_id: str, gateway_url: str) -> DeviceIdentity | None:
    if not StateLayout(state_dir).settings.exists():
        return None
    identity = load_identity(state_dir)
    if identity.device_id != device_id or identity.gateway_url != gateway_url:
        raise StateError(
            f"{state_dir}: already enrolled as {identity.device_id!r} with "
            f"{identity.gateway_url}; use another --state directory"
        )
    if identity.not_after <= time.time():
        raise StateError(f"{state_dir}: certificate expired; re-register the device")
    return identity


def _advertised_mqtt(client: GatewayClient) -> str | None:
    """The MQTT URL the gateway advertises in its metadata (None if it has none)."""
    try:
        uri = client.metadata().get("mqtt_uri")
    except AgentError:
        return None  # `run --mqtt` can still name it
    return uri if isinstance(uri, str) else None


def _read_ca(ca_file: Path) -> bytes:
    try:
        data = ca_file.read_bytes()
        load_certificate(data)
    except OSError as exc:
        raise StateError(f"cannot read CA file {ca_file}: {exc.strerror}") from exc
    except PkiError as exc:
        raise StateError(f"{ca_file}: not a PEM certificate") from exc
    return data


def _leaf_for(certs: list[x509.Certificate], key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """PKCS#7 carries an unordered set: pick the certificate for our public key."""
    ours = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    for cert in certs:
        if cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) == ours:
            return cert
    raise CertificateMismatch("the gateway's answer holds no certificate for our key")
