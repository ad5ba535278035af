"""PKI helpers both sides need: keys, CSRs, PEM/DER loading, thumbprints, PKCS#7.

Owns: generating P-256 keys, building and parsing CSRs, loading certificates and
keys, the RFC 8705 `x5t#S256` thumbprint, PKCS#7 certs-only encoding and decoding
(RFC 7030 wire form), and writing files atomically (keys with mode 0600).
Must not: decide policy (what a CA may issue lives in `gateway.csr_policy`), log key
material, or talk to the network.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.errors import PkiError

__all__ = [
    "PrivateKey",
    "b64url",
    "build_csr",
    "cert_fingerprint",
    "certs_from_pkcs7",
    "certs_to_pkcs7",
    "generate_p256_key",
    "load_certificate",
    "load_certificates",
    "load_csr",
    "load_private_key",
    "private_key_pem",
    "write_file_atomic",
    "write_private_key",
    "x5t_s256",
]

PrivateKey = ec.EllipticCurvePrivateKey

KEY_FILE_MODE = 0o600


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def generate_p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM; callers must write it with `write_private_key`."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Load an EC private key from PEM; anything else is a `PkiError`."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError("not a readable unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("private key is not an EC key")
    return key


def build_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.CertificateSigningRequest:
    """A minimal CSR: Subject `CN=<common_name>`, no requested extensions, SHA-256."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Load a CSR from PEM or DER."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise PkiError("not a readable PKCS#10 certificate request") from exc


def load_certificate(data: bytes) -> x509.Certificate:
    """Load one certificate from PEM or DER."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise PkiError("not a readable X.509 certificate") from exc


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Load every certificate of a PEM bundle."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PkiError("not a readable PEM certificate bundle") from exc
    return certs


def cert_fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 over the certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def x5t_s256(cert_der_or_cert: bytes | x509.Certificate) -> str:
    """RFC 8705 `x5t#S256`: base64url(SHA-256(DER certificate))."""
    if isinstance(cert_der_or_cert, x509.Certificate):
        return b64url(cert_fingerprint(cert_der_or_cert))
    return b64url(hashlib.sha256(cert_der_or_cert).digest())


def certs_to_pkcs7(certs: Sequence[x509.Certificate]) -> bytes:
    """RFC 7030 certs-only body: base64 of a degenerate PKCS#7 SignedData (DER)."""
    from cryptography.hazmat.primitives.serialization import pkcs7  # see certs_from_pkcs7

    der = pkcs7.serialize_certificates(list(certs), serialization.Encoding.DER)
    return base64.encodebytes(der)


def certs_from_pkcs7(body: bytes) -> list[x509.Certificate]:
    """Decode an RFC 7030 certs-only body (base64 DER, whitespace allowed)."""
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
        # Imported here: the PKCS#7 module pulls in every cipher (about 2.7 MB of RSS),
        # and a device needs it only when it enrolls or renews, not while it publishes.
        from cryptography.hazmat.primitives.serialization import pkcs7

        certs = pkcs7.load_der_pkcs7_certificates(der)
    except (binascii.Error, ValueError) as exc:
        raise PkiError("not a base64 PKCS#7 certs-only structure") from exc
    if not certs:
        raise PkiError("PKCS#7 structure holds no certificate")
    return certs


def write_file_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that readers see the old or the new file, never half.

    The temporary file is created with `mode` from the start, so a key never exists
    on disk with wider permissions, not even for an instant.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write a private key as PKCS#8 PEM with mode 0600, atomically."""
    write_file_atomic(path, private_key_pem(key), KEY_FILE_MODE)


def _fsync_dir(directory: Path) -> None:
    # A rename is durable only once its directory entry is; best effort on odd filesystems.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
