"""gateway.authority: every field of the CA, server and device certificates."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from gateway.authority import (
    CLOCK_SKEW,
    SERIAL_BITS,
    create_ca,
    create_server_certificate,
    issue_device_certificate,
    random_serial,
)
from shared.errors import PkiError
from shared.pki import build_csr, generate_p256_key

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return create_ca(NOW)


T = TypeVar("T", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[T]) -> x509.Extension[T]:
    return cert.extensions.get_extension_for_class(kind)


def test_ca_is_p256_self_signed_with_path_length_zero(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    cert, key = ca
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert public_key == key.public_key()
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "Gatepass Device CA"
    )
    cert.verify_directly_issued_by(cert)
    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + timedelta(days=3652)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_ca_requires_an_aware_datetime() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        create_ca(datetime(2025, 1, 1))


def test_server_certificate_names_and_usage(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    ca_cert, ca_key = ca
    cert, key = create_server_certificate(
        ca_cert, ca_key, ["gw.example", "10.0.0.7", "fe80::1", "localhost"], NOW
    )
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca_cert)
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "gw.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("fe80::1"),
    ]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    assert _ext(cert, x509.KeyUsage).value.digital_signature
    _ext(cert, x509.SubjectKeyIdentifier)
    _ext(cert, x509.AuthorityKeyIdentifier)
    for name in ("localhost", "gw.example"):
        verifier = (
            PolicyBuilder()
            .store(Store([ca_cert]))
            .time(NOW)
            .build_server_verifier(x509.DNSName(name))
        )
        verifier.verify(cert, [])
    ip_verifier = (
        PolicyBuilder()
        .store(Store([ca_cert]))
        .time(NOW)
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )
    ip_verifier.verify(cert, [])


def test_server_certificate_refuses_an_empty_host(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    with pytest.raises(PkiError):
        create_server_certificate(*ca, [" "], NOW)


def test_mismatched_ca_key_is_refused(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    csr = build_csr(generate_p256_key(), "dev-1")
    with pytest.raises(PkiError, match="does not match"):
        issue_device_certificate(csr, "dev-1", ca[0], generate_p256_key(), NOW)


def test_device_certificate_follows_the_template(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    ca_cert, ca_key = ca
    device_key = generate_p256_key()
    cert = issue_device_certificate(build_csr(device_key, "dev-1"), "dev-1", ca_cert, ca_key, NOW)

    cert.verify_directly_issued_by(ca_cert)
    assert cert.public_key() == device_key.public_key()
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    assert cert.issuer == ca_cert.subject
    assert cert.version == x509.Version.v3
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(days=30)
    assert 0 < cert.serial_number < 2**SERIAL_BITS

    basic = _ext(cert, x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.key_agreement)
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("urn:gatepass:device:dev-1")]
    assert _ext(cert, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(device_key.public_key())
    )
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    ca_ski = _ext(ca_cert, x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert {ext.oid for ext in cert.extensions} == {
        x509.BasicConstraints.oid,
        x509.KeyUsage.oid,
        x509.ExtendedKeyUsage.oid,
        x509.SubjectAlternativeName.oid,
        x509.SubjectKeyIdentifier.oid,
        x509.AuthorityKeyIdentifier.oid,
    }

    verifier = PolicyBuilder().store(Store([ca_cert])).time(NOW).build_client_verifier()
    verified = verifier.verify(cert, [])
    assert verified.chain == [cert, ca_cert]


def test_requested_extensions_are_never_copied(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    key = generate_p256_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bank.example")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert = issue_device_certificate(csr, "dev-1", *ca, NOW)
    assert not _ext(cert, x509.BasicConstraints).value.ca
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_device_certificate_over_an_ed25519_key(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-ed")]))
        .sign(key, None)
    )
    cert = issue_device_certificate(csr, "dev-ed", *ca, NOW, timedelta(days=1))
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_after_utc == NOW + timedelta(days=1)


def test_device_certificate_never_outlives_the_ca(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    ca_cert, ca_key = ca
    late = ca_cert.not_valid_after_utc - timedelta(days=2)
    cert = issue_device_certificate(
        build_csr(generate_p256_key(), "dev-1"), "dev-1", ca_cert, ca_key, late
    )
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_serials_carry_128_random_bits() -> None:
    serials = [random_serial() for _ in range(256)]
    assert len(set(serials)) == len(serials)
    assert all(0 < serial < 2**SERIAL_BITS for serial in serials)
    # With 128 random bits, the top bit is set about half the time; all zero would
    # mean the serial space is smaller than claimed.
    assert max(serial.bit_length() for serial in serials) == SERIAL_BITS
    assert 64 < sum(serial >> (SERIAL_BITS - 1) for serial in serials) < 192


def test_issued_serials_differ(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    csr = build_csr(generate_p256_key(), "dev-1")
    first = issue_device_certificate(csr, "dev-1", *ca, NOW)
    second = issue_device_certificate(csr, "dev-1", *ca, NOW)
    assert first.serial_number != second.serial_number
