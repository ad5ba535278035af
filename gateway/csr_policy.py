"""What the CA accepts in a certificate signing request: EST body parsing and CSR policy.

Owns: decoding an RFC 7030 / RFC 8951 request body (base64 of a DER PKCS#10 request;
whitespace and CRLFs tolerated) and the policy a CSR must pass before
`gateway.authority` issues from it:

* the CSR's own signature verifies (else `BadRequest`);
* signature hash SHA-256 or SHA-384 (Ed25519 signs without a separate hash);
* key P-256, P-384, Ed25519, or RSA of 2048 to 8192 bits with e = 65537;
* Subject is exactly one attribute, `CN=<device id>`, with no control characters;
* requested extensions may not ask for CA:TRUE, keyCertSign or cRLSign, or an
  extended key usage other than clientAuth (they are never copied anyway);
* the public key is not one the caller forbids (the CA's, other devices').

Refusals raise `Forbidden` (policy) or `BadRequest` (unreadable or self-contradictory
request); `public` is short and safe to show a client, `cause` is for the audit log.
Must not: issue certificates, read the registry, clocks or configuration, or do I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import unicodedata
from collections.abc import Collection
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import BadRequest, Forbidden

__all__ = [
    "ALLOWED_CURVES",
    "ALLOWED_HASHES",
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "RSA_EXPONENT",
    "check_csr",
    "parse_est_body",
    "spki_sha256",
]

ALLOWED_HASHES: Final = frozenset({"sha256", "sha384"})
ALLOWED_CURVES: Final = frozenset({"secp256r1", "secp384r1"})
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 8192
"""Larger keys only cost the CA time; no device needs them."""
RSA_EXPONENT: Final = 65537

_REFUSED: Final = "certificate request refused by policy"
_MALFORMED: Final = "malformed certificate request"


def parse_est_body(body: bytes) -> x509.CertificateSigningRequest:
    """Decode an EST `application/pkcs10` body: base64 (whitespace allowed) of DER.

    Raises `BadRequest` for bad base64, bad DER, or a request whose subject or
    extensions cannot be read.
    """
    compact = b"".join(body.split())
    if not compact:
        raise BadRequest("empty request body")
    try:
        der = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("body is not base64", cause=f"base64: {exc}") from exc
    try:
        csr = x509.load_der_x509_csr(der)
    except (ValueError, x509.InvalidVersion) as exc:
        raise BadRequest("body is not a DER PKCS#10 request", cause=f"DER: {exc}") from exc
    _readable_subject(csr)
    _readable_extensions(csr)
    return csr


def check_csr(
    csr: x509.CertificateSigningRequest,
    device_id: str,
    *,
    forbidden_public_keys: Collection[bytes] = (),
) -> None:
    """Raise unless `csr` may be signed for `device_id`; see the module docstring.

    `forbidden_public_keys` holds SHA-256 digests of DER SubjectPublicKeyInfo
    (`spki_sha256`): the CA's own key and keys other devices already use.
    """
    public_key = _public_key(csr)
    _check_key(public_key)
    _check_signature_hash(csr, public_key)
    _check_signature(csr)
    _check_subject(_readable_subject(csr), device_id)
    _check_extensions(_readable_extensions(csr))
    if spki_sha256(public_key) in forbidden_public_keys:
        raise Forbidden("public key not allowed", cause="public key is forbidden (CA or reused)")


def spki_sha256(public_key: CertificatePublicKeyTypes) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: identifies a key whatever its type."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def _public_key(csr: x509.CertificateSigningRequest) -> CertificatePublicKeyTypes:
    try:
        return csr.public_key()
    except UnsupportedAlgorithm as exc:
        raise Forbidden("key type not allowed", cause=f"unsupported key: {exc}") from exc
    except ValueError as exc:
        raise BadRequest(_MALFORMED, cause=f"unreadable public key: {exc}") from exc


def _check_key(public_key: CertificatePublicKeyTypes) -> None:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ALLOWED_CURVES:
            raise Forbidden("key type not allowed", cause=f"EC curve {public_key.curve.name}")
        return
    if isinstance(public_key, rsa.RSAPublicKey):
        _check_rsa(public_key)
        return
    raise Forbidden("key type not allowed", cause=f"key type {type(public_key).__name__}")


def _check_rsa(public_key: rsa.RSAPublicKey) -> None:
    bits = public_key.key_size
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise Forbidden("RSA key size not allowed", cause=f"RSA key of {bits} bits")
    exponent = public_key.public_numbers().e
    if exponent != RSA_EXPONENT:
        raise Forbidden("RSA exponent not allowed", cause=f"RSA exponent {exponent}")


def _check_signature_hash(
    csr: x509.CertificateSigningRequest, public_key: CertificatePublicKeyTypes
) -> None:
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise Forbidden("signature algorithm not allowed", cause=f"signature: {exc}") from exc
    if algorithm is None:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
            return
        raise Forbidden("signature algorithm not allowed", cause="signature without hash")
    if not isinstance(algorithm, hashes.HashAlgorithm) or algorithm.name not in ALLOWED_HASHES:
        raise Forbidden("signature hash not allowed", cause=f"signature hash {algorithm.name}")


def _check_signature(csr: x509.CertificateSigningRequest) -> None:
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise BadRequest("CSR signature cannot be verified", cause=f"signature: {exc}") from exc
    if not valid:
        raise BadRequest("CSR signature is invalid")


def _readable_subject(csr: x509.CertificateSigningRequest) -> x509.Name:
    try:
        subject = csr.subject
        list(subject)
    except ValueError as exc:
        raise BadRequest(_MALFORMED, cause=f"unreadable subject: {exc}") from exc
    return subject


def _readable_extensions(csr: x509.CertificateSigningRequest) -> x509.Extensions:
    try:
        return csr.extensions
    except (x509.DuplicateExtension, x509.UnsupportedGeneralNameType, ValueError) as exc:
        raise BadRequest(_MALFORMED, cause=f"unreadable extensions: {exc}") from exc


def _check_subject(subject: x509.Name, device_id: str) -> None:
    for attribute in subject:
        if _has_control_character(attribute.value):
            raise Forbidden(_REFUSED, cause="control character in subject")
    attributes = list(subject)
    if len(subject.rdns) != 1 or len(attributes) != 1:
        raise Forbidden(
            "subject must be exactly CN=<device id>",
            cause=f"subject has {len(attributes)} attributes: {_describe(subject)}",
        )
    (attribute,) = attributes
    if attribute.oid != NameOID.COMMON_NAME or attribute.value != device_id:
        raise Forbidden(
            "subject must be exactly CN=<device id>",
            cause=f"subject {_describe(subject)} for device {device_id!r}",
        )


def _check_extensions(extensions: x509.Extensions) -> None:
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise Forbidden(_REFUSED, cause="CSR requests CA:TRUE")
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise Forbidden(_REFUSED, cause="CSR requests keyCertSign or cRLSign")
        if isinstance(value, x509.ExtendedKeyUsage):
            other = [oid.dotted_string for oid in value if oid != ExtendedKeyUsageOID.CLIENT_AUTH]
            if other:
                raise Forbidden(_REFUSED, cause=f"CSR requests extended key usage {other}")


def _has_control_character(value: str | bytes) -> bool:
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return any(unicodedata.category(char) == "Cc" for char in text)


def _describe(subject: x509.Name) -> str:
    """The subject as RFC 4514 text, escaped so an audit line stays one line."""
    return ascii(subject.rfc4514_string())[:200]
