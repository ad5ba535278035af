"""The device's identity on disk: trust anchor, private key, certificate, settings.

Owns: the layout of the agent state directory, installing an identity so that a
crash at any instant leaves either the old or the new one (key and certificate are
written into a fresh folder, then one symlink is swapped with `os.replace`), loading
it back with one clear error per problem, and the TLS contexts built from it.
Must not: talk to the network. The private key never leaves this directory.

    DIR/agent.json            device id, gateway URL, MQTT URL (written at enroll)
    DIR/ca.pem                the gateway's device CA: the only trust anchor
    DIR/identity -> ids/<n>   symlink to the current key + certificate folder
    DIR/ids/<n>/device.key    P-256 key, mode 0600
    DIR/ids/<n>/device.pem    certificate issued by the gateway
    DIR/outbox.db             store-and-forward (agent.outbox)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from agent.errors import CertificateMismatch, StateError
from shared.errors import PkiError
from shared.pki import load_certificate, load_private_key, write_file_atomic, write_private_key

__all__ = [
    "AEAD_CIPHERS",
    "DeviceIdentity",
    "StateLayout",
    "install_identity",
    "load_identity",
    "trust_context",
]

AEAD_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305"
)


@dataclass(frozen=True, slots=True)
class StateLayout:
    root: Path

    @property
    def settings(self) -> Path:
        return self.root / "agent.json"

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def current(self) -> Path:
        return self.root / "identity"

    @property
    def key(self) -> Path:
        return self.current / "device.key"

    @property
    def cert(self) -> Path:
        return self.current / "device.pem"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox.db"

    @property
    def status(self) -> Path:
        return self.root / "status.json"


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """A loaded identity: who we are, what we trust, and with which key."""

    layout: StateLayout
    device_id: str
    gateway_url: str
    mqtt_url: str | None
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    received_at: float
    """When the certificate was installed here (its file's mtime). The gateway backdates
    `notBefore` for clock skew, so the usable life is counted from receipt."""

    @property
    def not_before(self) -> float:
        return self.certificate.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.certificate.not_valid_after_utc.timestamp()

    def tls_context(self, *, client_cert: bool = True) -> ssl.SSLContext:
        """Trusting only the gateway's CA, presenting our certificate."""
        ctx = trust_context(self.layout.ca.read_bytes())
        if client_cert:
            ctx.load_cert_chain(str(self.layout.cert), str(self.layout.key))
        return ctx


def trust_context(ca_pem: bytes) -> ssl.SSLContext:
    """TLS 1.2+, AEAD ciphers only, the given CA as the only trust anchor."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(AEAD_CIPHERS)
    ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
    return ctx


def check_certificate_fits(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """The certificate must be for our public key and our device id."""
    ours = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    theirs = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise CertificateMismatch("the gateway returned a certificate for another key")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [device_id]:
        raise CertificateMismatch(f"the gateway returned a certificate not for {device_id!r}")


def install_identity(
    layout: StateLayout,
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    *,
    device_id: str,
    gateway_url: str | None = None,
    mqtt_url: str | None = None,
    ca_pem: bytes | None = None,
) -> None:
    """Write a new key and certificate beside the old ones, then swap them in at once."""
    check_certificate_fits(cert, key, device_id)
    layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if ca_pem is not None:
        write_file_atomic(layout.ca, ca_pem)
    ids = layout.root / "ids"
    ids.mkdir(mode=0o700, exist_ok=True)
    folder = ids / f"{cert.serial_number:032x}"
    write_private_key(folder / "device.key", key)
    write_file_atomic(folder / "device.pem", cert.public_bytes(Encoding.PEM))
    if gateway_url is not None:
        settings = {"device_id": device_id, "gateway_url": gateway_url, "mqtt_url": mqtt_url}
        write_file_atomic(layout.settings, json.dumps(settings, indent=2).encode(), 0o600)
    _swap_symlink(layout.current, Path("ids") / folder.name)
    _remove_stale(ids, keep=folder.name)


def load_identity(root: Path) -> DeviceIdentity:
    """Load the identity; every problem is one `StateError` line."""
    layout = StateLayout(root)
    if not layout.settings.exists():
        raise StateError(f"{root}: not enrolled (run 'gatepass-agent enroll' first)")
    try:
        settings = json.loads(layout.settings.read_text())
        device_id = str(settings["device_id"])
        gateway_url = str(settings["gateway_url"])
        mqtt_url = settings.get("mqtt_url")
        cert = load_certificate(layout.cert.read_bytes())
        received_at = layout.cert.stat().st_mtime
        key = load_private_key(layout.key.read_bytes())
        load_certificate(layout.ca.read_bytes())
    except (OSError, ValueError, KeyError, TypeError, PkiError) as exc:
        raise StateError(f"{root}: state directory is corrupt or unreadable ({exc})") from exc
    try:
        check_certificate_fits(cert, key, device_id)
    except CertificateMismatch as exc:
        raise StateError(f"{root}: state directory is inconsistent ({exc})") from exc
    return DeviceIdentity(layout, device_id, gateway_url, mqtt_url, cert, key, received_at)


def _swap_symlink(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    with contextlib.suppress(OSError):
        fd = os.open(link.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale(ids: Path, keep: str) -> None:
    """Keep only the current identity folder (the previous key is useless once swapped)."""
    for child in ids.iterdir():
        if child.name != keep:
            shutil.rmtree(child, ignore_errors=True)
