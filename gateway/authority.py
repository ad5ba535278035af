"""The device CA: recipes that create the CA and issue certificates from fixed templates.

Owns: creating the self-signed device CA (P-256, CA:TRUE pathLen 0), the TLS server
certificate of both listeners, and device client certificates. Every certificate is
built from a template written out here over `cryptography`'s `CertificateBuilder`;
nothing a client asked for (requested extensions, other subject attributes) is ever
copied. The current time is a parameter (timezone-aware `datetime`).

Must not: decide whether a CSR is acceptable (that is `gateway.csr_policy`), store
anything (that is `gateway.registry`), read clocks, files or configuration, or log
key material.

A certificate never outlives its issuer: `notAfter` is capped at the CA's `notAfter`.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import PkiError

__all__ = [
    "CLOCK_SKEW",
    "DEFAULT_CA_VALIDITY",
    "DEFAULT_DEVICE_VALIDITY",
    "DEFAULT_SERVER_VALIDITY",
    "DEVICE_URI_PREFIX",
    "LOOPBACK_NAMES",
    "SERIAL_BITS",
    "create_ca",
    "create_server_certificate",
    "device_uri",
    "issue_device_certificate",
    "random_serial",
    "server_alt_names",
]

CLOCK_SKEW: Final = timedelta(minutes=5)
"""How far `notBefore` is backdated, so devices with a slow clock accept a new cert."""

DEFAULT_CA_VALIDITY: Final = timedelta(days=3652)
DEFAULT_SERVER_VALIDITY: Final = timedelta(days=825)
DEFAULT_DEVICE_VALIDITY: Final = timedelta(days=30)

DEVICE_URI_PREFIX: Final = "urn:gatepass:device:"
SERIAL_BITS: Final = 128
"""Random bits in every serial number (CA/B Forum asks for at least 64)."""

LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1")
"""Subject alternative names every server certificate carries."""

_SIGNATURE_HASH: Final = hashes.SHA256()


def create_ca(
    now: datetime,
    common_name: str = "Gatepass Device CA",
    validity: timedelta = DEFAULT_CA_VALIDITY,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed P-256 CA that may sign end-entity certificates only."""
    _require_aware(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(key, _SIGNATURE_HASH), key


def create_server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    now: datetime,
    validity: timedelta = DEFAULT_SERVER_VALIDITY,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The TLS identity of both listeners: SANs loopback names plus each of `hosts`.

    A host that parses as an IP address becomes an IPAddress SAN, anything else a
    DNSName. Raises `PkiError` for an empty host name.
    """
    _require_aware(now)
    _check_ca_pair(ca_cert, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Gatepass Gateway")])
    builder = (
        _end_entity_builder(ca_cert, subject, key.public_key(), now, validity)
        .add_extension(x509.SubjectAlternativeName(server_alt_names(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return builder.sign(ca_key, _SIGNATURE_HASH), key


def issue_device_certificate(
    csr: x509.CertificateSigningRequest,
    device_id: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    validity: timedelta = DEFAULT_DEVICE_VALIDITY,
) -> x509.Certificate:
    """A client certificate for `device_id` over the CSR's public key, from the template.

    Only the public key is taken from the CSR; the caller must have run
    `gateway.csr_policy.check_csr` first. Template: 128-bit random serial, subject
    `CN=<device_id>`, CA:FALSE (critical), keyUsage digitalSignature (critical), EKU
    clientAuth, SKI, AKI, SAN `URI:urn:gatepass:device:<id>`, valid from `now` minus
    `CLOCK_SKEW` to `now + validity`, signed ECDSA-SHA256.
    """
    _require_aware(now)
    _check_ca_pair(ca_cert, ca_key)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    builder = (
        _end_entity_builder(ca_cert, subject, csr.public_key(), now, validity)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_uri(device_id))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    return builder.sign(ca_key, _SIGNATURE_HASH)


def device_uri(device_id: str) -> str:
    """The SAN URI naming a device: `urn:gatepass:device:<id>`."""
    return DEVICE_URI_PREFIX + device_id


def server_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Loopback names first, then each host once, as IPAddress or DNSName entries."""
    names: list[x509.GeneralName] = []
    for host in (*LOOPBACK_NAMES, *hosts):
        name = _general_name(host)
        if name not in names:
            names.append(name)
    return names


def random_serial() -> int:
    """A positive serial with `SERIAL_BITS` random bits (DER: at most 17 octets)."""
    while True:
        serial = secrets.randbits(SERIAL_BITS)
        if serial:
            return serial


def _end_entity_builder(
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    now: datetime,
    validity: timedelta,
) -> x509.CertificateBuilder:
    """What every certificate the CA issues shares: CA:FALSE, digitalSignature, SKI/AKI."""
    not_after = min(now + validity, ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
    )


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_ca_public_key(ca_cert))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_public_key(ca_cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PkiError("the CA certificate does not hold an EC public key")
    return public_key


def _check_ca_pair(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
    if _ca_public_key(ca_cert) != ca_key.public_key():
        raise PkiError("the CA private key does not match the CA certificate")


def _general_name(host: str) -> x509.GeneralName:
    host = host.strip()
    if not host:
        raise PkiError("empty host name for the server certificate")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host.lower())


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("`now` must be a timezone-aware datetime")
