"""Tests of shared.tokens: minting, the attack catalogue, caching, robustness."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import tokens
from shared.claims import AccessTokenClaims, AclEntry
from shared.keyset import KeySet, SigningKey
from shared.tokens import (
    LEEWAY_SECONDS,
    MAX_TOKEN_BYTES,
    RejectReason,
    TokenRejected,
    TokenVerifier,
    mint_access_token,
    new_access_token_claims,
    verify_jws_signature,
)

ISS = "https://gatepass.example"
AUD = "gatepass-mqtt"
NOW = 1_700_000_000.0
T0 = int(NOW)
THUMB = base64.urlsafe_b64encode(hashlib.sha256(b"cert").digest()).rstrip(b"=").decode()
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ACL = (
    AclEntry(permission="allow", action="publish", topic="devices/dev-1/#"),
    AclEntry(permission="allow", action="subscribe", topic="devices/dev-1/commands/#"),
)

KEY = SigningKey.generate()
OTHER_KEY = SigningKey.generate()


# --- helpers: forge tokens by hand, independent of any JWT library -------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def enc(part: dict[str, Any] | list[Any] | str | bytes) -> str:
    """base64url of a JSON value; str/bytes are taken as raw JSON text."""
    if isinstance(part, bytes):
        return b64(part)
    if isinstance(part, str):
        return b64(part.encode())
    return b64(json.dumps(part, separators=(",", ":")).encode())


def es256(key: SigningKey, signing_input: str) -> bytes:
    der = key.private_key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def header(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"alg": "ES256", "typ": "at+jwt", "kid": KEY.kid}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "sub": "dev-1",
        "aud": AUD,
        "client_id": "dev-1",
        "iat": T0,
        "nbf": T0,
        "exp": T0 + 300,
        "jti": "jti-1",
        "cnf": {"x5t#S256": THUMB},
        "acl": [a.model_dump() for a in ACL],
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def forge(
    hdr: dict[str, Any] | str | bytes | None = None,
    payload: dict[str, Any] | list[Any] | str | bytes | None = None,
    *,
    key: SigningKey | None = KEY,
    signature: bytes | None = None,
) -> str:
    signing_input = (
        f"{enc(header() if hdr is None else hdr)}.{enc(claims() if payload is None else payload)}"
    )
    if signature is None:
        signature = es256(key, signing_input) if key is not None else b""
    return f"{signing_input}.{b64(signature)}"


def verifier(**kwargs: Any) -> TokenVerifier:
    return TokenVerifier(KeySet.of(KEY), issuer=ISS, audience=AUD, **kwargs)


def rejected(token: str, now: float = NOW, v: TokenVerifier | None = None) -> RejectReason:
    with pytest.raises(TokenRejected) as info:
        (v or verifier()).verify(token, now)
    return info.value.reason


# --- happy path and minting ----------------------------------------------------------


def test_minted_token_verifies_to_the_same_claims() -> None:
    minted = new_access_token_claims(
        device_id="dev-1",
        acl=ACL,
        cert_thumbprint=THUMB,
        issuer=ISS,
        audience=AUD,
        lifetime=300,
        now=NOW,
    )
    token = mint_access_token(minted, KEY)
    assert verifier().verify(token, NOW) == minted


def test_minted_header_is_exactly_alg_typ_kid() -> None:
    minted = new_access_token_claims(
        device_id="dev-1",
        acl=ACL,
        cert_thumbprint=THUMB,
        issuer=ISS,
        audience=AUD,
        lifetime=300,
        now=NOW,
    )
    token = mint_access_token(minted, KEY)
    head = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert head == {"alg": "ES256", "typ": "at+jwt", "kid": KEY.kid}


def test_new_claims_fields() -> None:
    c = new_access_token_claims(
        device_id="dev-1",
        acl=ACL,
        cert_thumbprint=THUMB,
        issuer=ISS,
        audience=AUD,
        lifetime=300,
        now=NOW + 0.9,
        scope="rabbitmq.write:*/*",
    )
    assert (c.iat, c.nbf, c.exp) == (T0, T0, T0 + 300)
    assert c.sub == c.client_id == "dev-1"
    assert c.cnf.x5t_s256 == THUMB
    assert c.scope == "rabbitmq.write:*/*"
    assert len(base64.urlsafe_b64decode(c.jti + "==")) == 16
    other = new_access_token_claims(
        device_id="dev-1",
        acl=ACL,
        cert_thumbprint=THUMB,
        issuer=ISS,
        audience=AUD,
        lifetime=300,
        now=NOW,
    )
    assert other.jti != c.jti


def test_new_claims_exp_is_capped_by_certificate_not_after() -> None:
    c = new_access_token_claims(
        device_id="dev-1",
        acl=ACL,
        cert_thumbprint=THUMB,
        issuer=ISS,
        audience=AUD,
        lifetime=300,
        now=NOW,
        not_after=NOW + 60.5,
    )
    assert c.exp == T0 + 60


@pytest.mark.parametrize(
    ("lifetime", "not_after"), [(0, None), (-5, None), (300, NOW), (300, NOW - 1)]
)
def test_new_claims_refuses_impossible_lifetimes(lifetime: int, not_after: float | None) -> None:
    with pytest.raises(ValueError):
        new_access_token_claims(
            device_id="dev-1",
            acl=ACL,
            cert_thumbprint=THUMB,
            issuer=ISS,
            audience=AUD,
            lifetime=lifetime,
            now=NOW,
            not_after=not_after,
        )


def test_mint_refuses_a_token_verifiers_would_reject_as_too_large() -> None:
    big_acl = [
        AclEntry(permission="allow", action="all", topic=f"devices/dev-1/t{i}") for i in range(100)
    ]
    c = new_access_token_claims(
        device_id="dev-1",
        acl=big_acl,
        cert_thumbprint=THUMB,
        issuer=ISS,
        audience=AUD,
        lifetime=300,
        now=NOW,
    )
    with pytest.raises(ValueError, match="bytes"):
        mint_access_token(c, KEY)


def test_hand_forged_valid_token_is_accepted() -> None:
    got = verifier().verify(forge(), NOW)
    assert isinstance(got, AccessTokenClaims)
    assert got.acl == ACL


def test_scope_claim_round_trips() -> None:
    got = verifier().verify(forge(payload=claims(scope="rabbitmq.read:*/*")), NOW)
    assert got.scope == "rabbitmq.read:*/*"


def test_pyjwt_accepts_our_tokens_and_we_accept_pyjwts() -> None:
    c = new_access_token_claims(
        device_id="dev-1",
        acl=ACL,
        cert_thumbprint=THUMB,
        issuer=ISS,
        audience=AUD,
        lifetime=300,
        now=NOW,
    )
    ours = mint_access_token(c, KEY)
    decoded = jwt.decode(
        ours,
        KEY.public_key,
        algorithms=["ES256"],
        audience=AUD,
        issuer=ISS,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert decoded == c.to_jwt_payload()
    theirs = jwt.encode(
        c.to_jwt_payload(),
        KEY.private_key,
        algorithm="ES256",
        headers={"typ": "at+jwt", "kid": KEY.kid},
    )
    assert verifier().verify(theirs, NOW) == c


def test_audience_list_containing_ours_is_accepted() -> None:
    got = verifier().verify(forge(payload=claims(aud=["other", AUD])), NOW)
    assert got.audiences == ("other", AUD)


def test_jws_layer_returns_header_and_payload_bytes() -> None:
    head, payload = verify_jws_signature(
        forge(hdr=header(typ=None), payload=b"foo"), KeySet.of(KEY), typ=None
    )
    assert head == {"alg": "ES256", "kid": KEY.kid}
    assert payload == b"foo"


# --- the attack catalogue --------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_in_any_case(alg: str) -> None:
    assert rejected(forge(hdr=header(alg=alg), key=None)) is RejectReason.bad_algorithm
    # and with a (meaningless) signature attached
    assert (
        rejected(forge(hdr=header(alg=alg), signature=b"\x01" * 64)) is RejectReason.bad_algorithm
    )


@pytest.mark.parametrize(
    "secret",
    [
        KEY.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        KEY.public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        ),
        KEY.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ],
)
def test_hs256_with_public_key_as_hmac_secret(secret: bytes) -> None:
    signing_input = f"{enc(header(alg='HS256'))}.{enc(claims())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    assert rejected(f"{signing_input}.{b64(mac)}") is RejectReason.bad_algorithm


@pytest.mark.parametrize(
    ("r", "s"),
    [(0, 0), (P256_N, P256_N), (0, 1), (1, 0), (P256_N, 1), (1, P256_N), (2**256 - 1, 2**256 - 1)],
)
def test_ecdsa_out_of_range_r_s(r: int, s: int) -> None:
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert rejected(forge(signature=sig)) is RejectReason.bad_signature


def test_empty_signature() -> None:
    assert rejected(forge(signature=b"")) is RejectReason.bad_signature


@pytest.mark.parametrize("length", [1, 32, 63, 65, 72, 128])
def test_signature_of_wrong_length(length: int) -> None:
    good = forge()
    sig = base64.urlsafe_b64decode(good.rsplit(".", 1)[1] + "==")
    sig = (sig * 3)[:length]
    assert rejected(good.rsplit(".", 1)[0] + "." + b64(sig)) is RejectReason.bad_signature


def test_der_encoded_signature_is_refused() -> None:
    signing_input = f"{enc(header())}.{enc(claims())}"
    der = KEY.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    assert rejected(f"{signing_input}.{b64(der)}") is RejectReason.bad_signature


def test_signature_by_another_key_and_modified_payload() -> None:
    assert rejected(forge(key=OTHER_KEY)) is RejectReason.bad_signature
    good = forge()
    h, _, s = good.split(".")
    assert (
        rejected(f"{h}.{enc(claims(sub='dev-2', client_id='dev-2'))}.{s}")
        is RejectReason.bad_signature
    )


def test_high_s_signature_is_accepted() -> None:
    # ECDSA signatures are malleable ((r, n - s) also verifies); RFC 7518 does not
    # forbid it and Wycheproof lists it as valid. The cache key is the token text.
    good = forge()
    sig = base64.urlsafe_b64decode(good.rsplit(".", 1)[1] + "==")
    s = P256_N - int.from_bytes(sig[32:], "big")
    twin = good.rsplit(".", 1)[0] + "." + b64(sig[:32] + s.to_bytes(32, "big"))
    assert verifier().verify(twin, NOW) == verifier().verify(good, NOW)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t + "=",
        lambda t: t + "==",
        lambda t: t.replace(".", "=.", 1),
        lambda t: t.replace(".", "==.", 1),
        lambda t: " " + t,
        lambda t: t + " ",
        lambda t: t + "\n",
        lambda t: "\t" + t,
        lambda t: t[:20] + " " + t[20:],
        lambda t: t[:20] + "\n" + t[20:],
        lambda t: t.replace(".", ". ", 1),
        lambda t: t.replace("-", "+").replace("_", "/") if ("-" in t or "_" in t) else t + "+",
        lambda t: t + ".",
        lambda t: t.rsplit(".", 1)[0],
        lambda t: "." + t,
        lambda t: t.replace(".", "..", 1),
        lambda t: t.split(".", 1)[1],
        lambda t: "",
        lambda t: "Bearer " + t,
    ],
)
def test_framing_padding_and_whitespace(mutate: Callable[[str], str]) -> None:
    assert rejected(mutate(forge())) is RejectReason.malformed


def test_non_canonical_base64_is_malformed() -> None:
    # "AB" decodes like "AA" if the unused low bits are ignored.
    h, p, s = forge().split(".")
    assert rejected(f"{h}.{p}.{s[:-1]}B") in {RejectReason.malformed}
    assert rejected(f"{h}.AAAAA.{s}") is RejectReason.malformed  # length 1 mod 4 impossible


def test_five_segment_jwe() -> None:
    jwe = ".".join([enc({"alg": "RSA-OAEP", "enc": "A256GCM"}), "AAAA", "AAAA", "AAAA", "AAAA"])
    assert rejected(jwe) is RejectReason.malformed


def test_duplicate_alg_in_header() -> None:
    raw = f'{{"alg":"ES256","typ":"at+jwt","kid":"{KEY.kid}","alg":"none"}}'
    assert rejected(forge(hdr=raw)) is RejectReason.duplicate_key


def test_duplicate_sub_in_payload() -> None:
    body = json.dumps(claims())[:-1] + ', "sub": "dev-2"}'
    assert rejected(forge(payload=body)) is RejectReason.duplicate_key


def test_duplicate_key_in_nested_object() -> None:
    body = json.dumps(claims()).replace('{"x5t#S256"', '{"x5t#S256": "x", "x5t#S256"')
    assert rejected(forge(payload=body)) is RejectReason.duplicate_key


@pytest.mark.parametrize(
    "bad",
    [
        {"exp": str(T0 + 300)},
        {"exp": True},
        {"iat": False},
        {"nbf": float(T0)},
        {"exp": T0 + 300.5},
        {"exp": None, "iat": T0},
        {"exp": -1},
        {"exp": 2**64},
        {"client_id": "dev-2"},
        {"sub": ""},
        {"exp": T0, "iat": T0},
        {"nbf": T0 + 400},
        {"extra": "claim"},
        {"cnf": {"x5t#S256": "too-short"}},
        {"cnf": {}},
        {"acl": [{"permission": "allow", "action": "publish"}]},
        {"acl": [{"permission": "maybe", "action": "publish", "topic": "a"}]},
        {"acl": [{"permission": "allow", "action": "publish", "topic": "a/#/b"}]},
        {"aud": []},
        {"aud": 7},
        {"iss": 1},
        {"jti": None},
    ],
)
def test_bad_claims(bad: dict[str, Any]) -> None:
    assert rejected(forge(payload=claims(**bad))) is RejectReason.bad_claims


@pytest.mark.parametrize("body", [b"[]", b'"claims"', b"123", b"null"])
def test_payload_must_be_an_object(body: bytes) -> None:
    assert rejected(forge(payload=body)) is RejectReason.bad_claims


@pytest.mark.parametrize(
    "body",
    [b"foo", b"\xff\xfe{}", b'{"exp": NaN}', b'{"exp": Infinity}', b"[" * 1400 + b"]" * 1400],
)
def test_payload_must_be_strict_json(body: bytes) -> None:
    token = forge(payload=body)
    assert len(token) <= MAX_TOKEN_BYTES
    assert rejected(token) is RejectReason.malformed


@pytest.mark.parametrize("raw", [b"[]", b'"ES256"', b"null", b"1"])
def test_header_must_be_an_object(raw: bytes) -> None:
    assert rejected(forge(hdr=raw)) is RejectReason.bad_header


def test_header_must_be_json() -> None:
    assert rejected(forge(hdr=b"{not json")) is RejectReason.malformed


@pytest.mark.parametrize("typ", ["JWT", "jwt", "AT+JWT", "application/at+jwt", "", None, 1])
def test_typ_must_be_at_jwt(typ: object) -> None:
    assert rejected(forge(hdr=header(typ=typ))) is RejectReason.wrong_type  # None: no typ


@pytest.mark.parametrize(
    "extra",
    [
        {"crit": ["exp"]},
        {"jku": "https://attacker.example/jwks.json"},
        {"x5u": "https://attacker.example/cert.pem"},
        {"x5c": ["MIIB"]},
        {"cty": "JWT"},
        {"b64": False},
        {"zip": "DEF"},
    ],
)
def test_forbidden_headers(extra: dict[str, Any]) -> None:
    assert rejected(forge(hdr=header(**extra))) is RejectReason.forbidden_header


def test_embedded_jwk_signed_by_attacker() -> None:
    attacker = SigningKey.generate()
    jwk = KeySet.of(attacker).to_jwks()["keys"][0]
    token = forge(hdr=header(kid=KEY.kid, jwk=jwk), key=attacker)
    assert rejected(token) is RejectReason.forbidden_header


def test_nested_jwt_with_cty() -> None:
    inner = forge()
    outer = forge(hdr=header(cty="JWT"), payload=inner.encode())
    assert rejected(outer) is RejectReason.forbidden_header


@pytest.mark.parametrize(
    "alg", ["RS256", "PS256", "ES384", "ES512", "EdDSA", "HS256", "es256", "ES256 ", ""]
)
def test_other_algorithms(alg: str) -> None:
    assert rejected(forge(hdr=header(alg=alg))) is RejectReason.bad_algorithm


@pytest.mark.parametrize("alg", [None, ["ES256"], {"alg": "ES256"}, 256])
def test_alg_missing_or_not_a_string(alg: object) -> None:
    assert rejected(forge(hdr=header(alg=alg))) is RejectReason.bad_algorithm  # None: no alg


@pytest.mark.parametrize(
    "kid", ["../../etc/passwd", "/dev/zero", "file:///etc/passwd", "", OTHER_KEY.kid, "x" * 500]
)
def test_unknown_or_path_like_kid(kid: str) -> None:
    assert rejected(forge(hdr=header(kid=kid))) is RejectReason.unknown_kid


@pytest.mark.parametrize("kid", [None, 1, [KEY.kid], {"kid": KEY.kid}])
def test_kid_missing_or_not_a_string(kid: object) -> None:
    assert rejected(forge(hdr=header(kid=kid))) is RejectReason.bad_header  # None: no kid


def test_one_mebibyte_token() -> None:
    token = forge() + "A" * (1 << 20)
    assert rejected(token) is RejectReason.too_large
    assert rejected("A" * (1 << 20)) is RejectReason.too_large


def test_size_limit_boundary() -> None:
    assert rejected("A" * (MAX_TOKEN_BYTES + 1)) is RejectReason.too_large
    assert rejected("A" * MAX_TOKEN_BYTES) is RejectReason.malformed


@pytest.mark.parametrize(
    "iss",
    [ISS[:-1], ISS + "/", ISS + ".attacker.example", "http://gatepass.example", ISS.upper(), ""],
)
def test_issuer_prefix_or_superstring(iss: str) -> None:
    reason = rejected(forge(payload=claims(iss=iss)))
    assert reason is (RejectReason.bad_claims if iss == "" else RejectReason.wrong_issuer)


@pytest.mark.parametrize("aud", ["other", AUD + "x", AUD[:-1], ["other"], ["other", AUD + "x"]])
def test_wrong_audience(aud: str | list[str]) -> None:
    assert rejected(forge(payload=claims(aud=aud))) is RejectReason.wrong_audience


# --- time ---------------------------------------------------------------------------


def test_expiry_and_leeway_boundary() -> None:
    token = forge()
    exp = T0 + 300
    v = verifier(cache_size=0)
    v.verify(token, exp + LEEWAY_SECONDS - 0.001)
    assert rejected(token, exp + LEEWAY_SECONDS, v) is RejectReason.expired
    assert rejected(token, exp + 10_000, v) is RejectReason.expired


def test_nbf_in_future_beyond_leeway() -> None:
    v = verifier(cache_size=0)
    token = forge(payload=claims(nbf=T0 + 100, iat=T0))
    v.verify(token, T0 + 100 - LEEWAY_SECONDS)
    assert rejected(token, T0 + 100 - LEEWAY_SECONDS - 0.001, v) is RejectReason.not_yet_valid
    assert rejected(token, T0, v) is RejectReason.not_yet_valid


def test_iat_in_future_beyond_leeway() -> None:
    v = verifier(cache_size=0)
    token = forge(payload=claims(iat=T0 + 100, nbf=T0, exp=T0 + 400))
    v.verify(token, T0 + 100 - LEEWAY_SECONDS)
    assert rejected(token, T0 + 100 - LEEWAY_SECONDS - 0.001, v) is RejectReason.issued_in_future


def test_leeway_is_configurable() -> None:
    v = verifier(leeway=0, cache_size=0)
    token = forge()
    assert rejected(token, T0 + 300, v) is RejectReason.expired
    v.verify(token, T0 + 299.999)


@pytest.mark.parametrize("now", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_now_is_refused(now: float) -> None:
    assert rejected(forge(), now) is RejectReason.internal_error


# --- cache ---------------------------------------------------------------------------


class CountingEs256:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._real = tokens._verify_es256
        monkeypatch.setattr(tokens, "_verify_es256", self)

    def __call__(self, *args: Any) -> None:
        self.calls += 1
        self._real(*args)


def test_cache_hit_returns_same_claims_without_reverifying(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingEs256(monkeypatch)
    v = verifier()
    token = forge()
    first = v.verify(token, NOW)
    second = v.verify(token, NOW + 1)
    assert second is first
    assert counter.calls == 1


def test_cache_hit_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingEs256(monkeypatch)
    v = verifier()
    token = forge()
    v.verify(token, NOW)
    v.verify(token, T0 + 300 + LEEWAY_SECONDS - 0.5)
    assert rejected(token, T0 + 300 + LEEWAY_SECONDS, v) is RejectReason.expired
    assert counter.calls == 1
    # a clock that goes backwards re-checks nbf/iat on a hit as well
    fresh = forge(payload=claims(nbf=T0 + 100, iat=T0 + 100, exp=T0 + 400))
    v.verify(fresh, T0 + 100)
    assert rejected(fresh, T0, v) is RejectReason.not_yet_valid


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingEs256(monkeypatch)
    v = verifier(cache_size=2)
    a, b, c = (forge(payload=claims(jti=f"j{i}")) for i in range(3))
    for token in (a, b, c):
        v.verify(token, NOW)
    assert counter.calls == 3
    v.verify(c, NOW)
    v.verify(b, NOW)
    assert counter.calls == 3  # b and c still cached
    v.verify(a, NOW)
    assert counter.calls == 4  # a was evicted first


def test_cache_size_zero_disables_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingEs256(monkeypatch)
    v = verifier(cache_size=0)
    token = forge()
    v.verify(token, NOW)
    v.verify(token, NOW)
    assert counter.calls == 2


def test_failures_are_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingEs256(monkeypatch)
    v = verifier()
    token = forge(payload=claims(aud="other"))
    for _ in range(2):
        assert rejected(token, NOW, v) is RejectReason.wrong_audience
    assert counter.calls == 2


def test_replace_keys_drops_retired_key() -> None:
    v = verifier()
    token = forge()
    v.verify(token, NOW)
    v.replace_keys(KeySet.of(OTHER_KEY))
    assert rejected(token, NOW, v) is RejectReason.unknown_kid
    assert v.keys.kids == (OTHER_KEY.kid,)
    v.replace_keys(KeySet.of(KEY, OTHER_KEY))
    v.verify(token, NOW)
    v.verify(forge(hdr=header(kid=OTHER_KEY.kid), key=OTHER_KEY), NOW)


# --- robustness ----------------------------------------------------------------------


def test_unexpected_exception_becomes_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(_payload: bytes) -> AccessTokenClaims:
        raise RuntimeError("boom")

    monkeypatch.setattr(tokens, "_validate_claims", boom)
    with pytest.raises(TokenRejected) as info:
        verifier().verify(forge(), NOW)
    assert info.value.reason is RejectReason.internal_error
    assert isinstance(info.value.__cause__, RuntimeError)


def test_unexpected_exception_in_key_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: KeySet, kid: str, default: object = None) -> object:
        raise MemoryError

    monkeypatch.setattr(KeySet, "get", boom)
    assert rejected(forge()) is RejectReason.internal_error
    with pytest.raises(TokenRejected) as info:
        verify_jws_signature(forge(), KeySet.of(KEY))
    assert info.value.reason is RejectReason.internal_error


def test_non_string_token_is_malformed() -> None:
    for token in (None, b"a.b.c", 123, ["a", "b", "c"]):
        assert rejected(token) is RejectReason.malformed  # type: ignore[arg-type]


def test_rejection_detail_is_short_and_never_the_token() -> None:
    token = forge(hdr=header(kid="k" * 1500))
    with pytest.raises(TokenRejected) as info:
        verifier().verify(token, NOW)
    assert token not in str(info.value)
    assert len(str(info.value)) < 250


def test_reject_reasons_cover_the_catalogue() -> None:
    required = {
        "too_large",
        "malformed",
        "duplicate_key",
        "bad_header",
        "wrong_type",
        "forbidden_header",
        "unknown_kid",
        "bad_algorithm",
        "bad_signature",
        "bad_claims",
        "wrong_issuer",
        "wrong_audience",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "internal_error",
    }
    assert required <= {r.value for r in RejectReason}
    assert RejectReason.expired == "expired"


def test_verifier_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        TokenVerifier(KeySet(), issuer="", audience=AUD)
    with pytest.raises(ValueError):
        TokenVerifier(KeySet(), issuer=ISS, audience=AUD, leeway=-1)
    with pytest.raises(TypeError):
        TokenVerifier({}, issuer=ISS, audience=AUD)  # type: ignore[arg-type]


_FUZZ_VERIFIER = TokenVerifier(KeySet.of(KEY), issuer=ISS, audience=AUD, cache_size=0)
_GOOD = forge()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=600))
def test_fuzz_arbitrary_text(token: str) -> None:
    try:
        _FUZZ_VERIFIER.verify(token, NOW)
    except TokenRejected:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet='ABCabc019-_.=+/ \n{}"', max_size=300),
    st.sampled_from([_GOOD, forge(hdr=header(alg="none"), key=None), ""]),
)
def test_fuzz_base64ish_text(suffix: str, prefix: str) -> None:
    try:
        _FUZZ_VERIFIER.verify(prefix + suffix, NOW)
    except TokenRejected:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(_GOOD) - 1), st.sampled_from("AQgw_-.=9 z"))
def test_fuzz_single_character_mutations(index: int, char: str) -> None:
    mutated = _GOOD[:index] + char + _GOOD[index + 1 :]
    try:
        got = _FUZZ_VERIFIER.verify(mutated, NOW)
    except TokenRejected:
        return
    assert mutated == _GOOD and got.sub == "dev-1"


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["alg", "typ", "kid", "crit", "jwk", "x"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.text(max_size=10),
            st.sampled_from(["ES256", "at+jwt", KEY.kid]),
            st.lists(st.integers(), max_size=2),
        ),
    ),
    st.recursive(
        st.one_of(
            st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
        ),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=10,
    ),
)
def test_fuzz_signed_json_structures(hdr: dict[str, Any], payload: Any) -> None:
    try:
        _FUZZ_VERIFIER.verify(forge(hdr=hdr, payload=json.dumps(payload)), NOW)
    except TokenRejected:
        pass
