"""gateway.csr_policy: every refusal, the accepted key types, and fuzzing of the parser."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.csr_policy import check_csr, parse_est_body, spki_sha256
from gateway.errors import BadRequest, ClientError, Forbidden
from shared.pki import build_csr, generate_p256_key

SigningKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def _cn(value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def make_csr(
    key: SigningKey | None = None,
    subject: x509.Name | None = None,
    extensions: tuple[tuple[x509.ExtensionType, bool], ...] = (),
    algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None = None,
) -> x509.CertificateSigningRequest:
    key = key or ec.generate_private_key(ec.SECP256R1())
    if subject is None:
        subject = x509.Name([_cn("dev-1")])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    if algorithm is None and not isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        algorithm = hashes.SHA256()
    return builder.sign(key, algorithm)


def est_body(csr: x509.CertificateSigningRequest) -> bytes:
    """Base64 DER with CRLF line breaks every 64 characters, as some clients send it."""
    text = base64.b64encode(csr.public_bytes(serialization.Encoding.DER))
    return b"\r\n".join(text[i : i + 64] for i in range(0, len(text), 64)) + b"\r\n"


def _key_usage(**flags: bool) -> x509.KeyUsage:
    names = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


# -- DER crafting for what cryptography refuses to build ------------------------------


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    encoded = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(encoded)]) + encoded + content


def _sha1_ecdsa_csr() -> x509.CertificateSigningRequest:
    """A correctly signed CSR whose signature uses ecdsa-with-SHA1 (1.2.840.10045.4.1)."""
    key = ec.generate_private_key(ec.SECP256R1())
    info = make_csr(key).tbs_certrequest_bytes
    signature = key.sign(info, ec.ECDSA(hashes.SHA1()))  # noqa: S303
    algorithm = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d0401")))
    der = _der(0x30, info + algorithm + _der(0x03, b"\x00" + signature))
    return x509.load_der_x509_csr(der)


# -- parse_est_body --------------------------------------------------------------------


def test_parse_accepts_base64_der_with_crlf() -> None:
    csr = make_csr()
    assert parse_est_body(est_body(csr)) == csr


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"  \r\n ", "empty"),
        (b"not base64 at all!", "base64"),
        (b"QUJ", "base64"),
        (b"QU=JD", "base64"),
        (base64.b64encode(b"definitely not DER"), "DER"),
        (b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----", "base64"),
    ],
)
def test_parse_refuses_garbage(body: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        parse_est_body(body)


def test_parse_refuses_trailing_bytes() -> None:
    der = make_csr().public_bytes(serialization.Encoding.DER)
    with pytest.raises(BadRequest):
        parse_est_body(base64.b64encode(der + b"\x00"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_raise_only_bad_request(body: bytes) -> None:
    for candidate in (body, base64.b64encode(body)):
        try:
            parse_est_body(candidate)
        except BadRequest:
            pass


_VALID_DER = make_csr().public_bytes(serialization.Encoding.DER)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, len(_VALID_DER) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_mutated_csr_raises_only_client_errors(edits: list[tuple[int, int]]) -> None:
    der = bytearray(_VALID_DER)
    for position, value in edits:
        der[position] = value
    try:
        csr = parse_est_body(base64.b64encode(bytes(der)))
        check_csr(csr, "dev-1")
    except (BadRequest, Forbidden):
        return
    # A mutation that survives both must have left the request intact in meaning.
    assert csr.is_signature_valid


# -- check_csr: accepted -------------------------------------------------------------


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate,
        lambda: rsa.generate_private_key(65537, 2048),
    ],
    ids=["p256", "p384", "ed25519", "rsa2048"],
)
def test_accepted_key_types(make_key: Callable[[], SigningKey]) -> None:
    check_csr(parse_est_body(est_body(make_csr(make_key()))), "dev-1")


def test_sha384_and_client_auth_request_are_accepted() -> None:
    csr = make_csr(
        ec.generate_private_key(ec.SECP384R1()),
        extensions=(
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (_key_usage(digital_signature=True), True),
        ),
        algorithm=hashes.SHA384(),
    )
    check_csr(csr, "dev-1")


# -- check_csr: refusals ------------------------------------------------------------


def _refused(csr: x509.CertificateSigningRequest, error: type[ClientError], cause: str) -> None:
    with pytest.raises(error) as info:
        check_csr(csr, "dev-1")
    assert cause in info.value.cause


def test_other_common_name() -> None:
    _refused(make_csr(subject=x509.Name([_cn("dev-2")])), Forbidden, "'CN=dev-2'")


def test_extra_subject_attribute() -> None:
    subject = x509.Name([_cn("dev-1"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")])
    _refused(make_csr(subject=subject), Forbidden, "2 attributes")


def test_subject_without_common_name() -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dev-1")])
    _refused(make_csr(subject=subject), Forbidden, "O=dev-1")


def test_empty_subject() -> None:
    _refused(make_csr(subject=x509.Name([])), Forbidden, "0 attributes")


@pytest.mark.parametrize("value", ["dev-1\x00", "dev\n-1", "dev-1\x7f", "dev-1\x85"])
def test_control_characters_in_subject(value: str) -> None:
    _refused(make_csr(subject=x509.Name([_cn(value)])), Forbidden, "control character")


def test_control_character_in_another_attribute() -> None:
    subject = x509.Name([_cn("dev-1"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "a\tb")])
    _refused(make_csr(subject=subject), Forbidden, "control character")


def test_ca_true_request() -> None:
    ext = (x509.BasicConstraints(ca=True, path_length=None), True)
    _refused(make_csr(extensions=(ext,)), Forbidden, "CA:TRUE")


@pytest.mark.parametrize("flag", ["key_cert_sign", "crl_sign"])
def test_key_cert_sign_request(flag: str) -> None:
    ext = (_key_usage(digital_signature=True, **{flag: True}), True)
    _refused(make_csr(extensions=(ext,)), Forbidden, "keyCertSign")


@pytest.mark.parametrize(
    "usage",
    [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CODE_SIGNING,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    ],
)
def test_other_extended_key_usage(usage: x509.ObjectIdentifier) -> None:
    ext = (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, usage]), False)
    _refused(make_csr(extensions=(ext,)), Forbidden, usage.dotted_string)


def test_rsa_1024() -> None:
    weak = rsa.generate_private_key(65537, 1024)  # noqa: S505 (the point of the test)
    _refused(make_csr(weak), Forbidden, "1024 bits")


def test_rsa_exponent_3() -> None:
    _refused(make_csr(rsa.generate_private_key(3, 2048)), Forbidden, "exponent 3")


def test_other_curve() -> None:
    _refused(make_csr(ec.generate_private_key(ec.SECP256K1())), Forbidden, "secp256k1")


def test_ed448() -> None:
    _refused(make_csr(ed448.Ed448PrivateKey.generate()), Forbidden, "Ed448")


def test_sha1_signature() -> None:
    csr = _sha1_ecdsa_csr()
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    # Genuinely signed (cryptography's is_signature_valid would not even try SHA-1).
    public_key.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(hashes.SHA1()))  # noqa: S303
    _refused(csr, Forbidden, "sha1")


def test_sha512_signature() -> None:
    _refused(make_csr(algorithm=hashes.SHA512()), Forbidden, "sha512")


def test_bad_signature() -> None:
    der = make_csr().public_bytes(serialization.Encoding.DER)
    tampered = der.replace(b"dev-1", b"dev-2")
    assert tampered != der
    csr = parse_est_body(base64.b64encode(tampered))
    with pytest.raises(BadRequest, match="signature"):
        check_csr(csr, "dev-2")


def test_forbidden_public_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key)
    forbidden = {spki_sha256(key.public_key()), b"\x00" * 32}
    with pytest.raises(Forbidden, match="public key"):
        check_csr(csr, "dev-1", forbidden_public_keys=forbidden)
    check_csr(csr, "dev-1", forbidden_public_keys={b"\x00" * 32})


def test_spki_sha256_differs_per_key_and_matches_across_types() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    other = ed25519.Ed25519PrivateKey.generate()
    digest = spki_sha256(key.public_key())
    assert len(digest) == 32
    assert digest == spki_sha256(make_csr(key).public_key())
    assert digest != spki_sha256(other.public_key())


def test_unknown_csr_version_is_bad_request() -> None:
    # Found by the fuzz test: cryptography raises InvalidVersion, not ValueError.
    der = build_csr(generate_p256_key(), "dev-1").public_bytes(serialization.Encoding.DER)
    version = der.index(b"\x02\x01\x00")  # CertificationRequestInfo.version = 0
    mutated = der[:version] + b"\x02\x01\x05" + der[version + 3 :]
    with pytest.raises(BadRequest):
        parse_est_body(base64.b64encode(mutated))
