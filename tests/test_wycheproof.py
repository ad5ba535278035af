"""Wycheproof vectors against the JWS layer and the ES256 signature primitive.

* json_web_signature_test.json: every ES256 vector is accepted or rejected exactly as
  the file says (with `typ` not required: the vectors are generic JWS, not at+jwt);
  every other algorithm is refused because ES256 is pinned; JSON serialization is
  refused by the compact-only parser.
* json_web_key_test.json: key sets we cannot use are refused by `KeySet.from_jwks`,
  and no vector verifies unless it is ES256 with a usable P-256 key.
* ecdsa_secp256r1_sha256_p1363_test.json: raw r||s signatures against
  `verify_es256_signature`. The file has no "acceptable" vectors; if a later version
  adds some, either outcome is allowed but the only permitted exception stays
  TokenRejected(bad_signature).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from shared.errors import PkiError
from shared.keyset import KeySet
from shared.tokens import RejectReason, TokenRejected, verify_es256_signature, verify_jws_signature

WYCHEPROOF = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "wycheproof"


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((WYCHEPROOF / name).read_text())
    return data


JWS = _load("json_web_signature_test.json")
JWK = _load("json_web_key_test.json")
P1363 = _load("ecdsa_secp256r1_sha256_p1363_test.json")


def _cases(data: dict[str, Any]) -> list[Any]:
    return [
        pytest.param(group, test, id=f"tc{test['tcId']}-{test['comment']}")
        for group in data["testGroups"]
        for test in group["tests"]
    ]


def _as_jwks(keys: dict[str, Any]) -> dict[str, Any]:
    return keys if "keys" in keys else {"keys": [keys]}


def _keyset(group: dict[str, Any]) -> KeySet | None:
    """The group's verification keys, or None if we refuse them (or there are none)."""
    jwks = group.get("public") or group.get("private")
    if jwks is None:
        return None
    try:
        return KeySet.from_jwks(_as_jwks(jwks))
    except PkiError:
        return None


def _header_alg(jws: str) -> object:
    try:
        head = json.loads(base64.urlsafe_b64decode(jws.split(".")[0] + "=="))
    except (ValueError, binascii.Error):
        return None
    return head.get("alg") if isinstance(head, dict) else None


def _check_jws_vector(group: dict[str, Any], test: dict[str, Any]) -> None:
    jws: str = test["jws"]
    keys = _keyset(group)
    alg = _header_alg(jws)
    if alg == "ES256" and test["result"] == "valid":
        assert keys is not None, "a valid ES256 vector needs a usable key"
        head, payload = verify_jws_signature(jws, keys, typ=None)
        assert head["alg"] == "ES256"
        assert payload == base64.urlsafe_b64decode(jws.split(".")[1] + "==")
        return
    with pytest.raises(TokenRejected) as info:
        verify_jws_signature(jws, keys or KeySet(), typ=None)
    reason = info.value.reason
    assert reason is not RejectReason.internal_error
    if jws.lstrip().startswith("{"):
        assert reason is RejectReason.malformed  # JSON serialization: compact only
    elif alg != "ES256":
        assert reason in {RejectReason.bad_algorithm, RejectReason.malformed}


@pytest.mark.parametrize(("group", "test"), _cases(JWS))
def test_json_web_signature(group: dict[str, Any], test: dict[str, Any]) -> None:
    _check_jws_vector(group, test)


@pytest.mark.parametrize(("group", "test"), _cases(JWK))
def test_json_web_key(group: dict[str, Any], test: dict[str, Any]) -> None:
    _check_jws_vector(group, test)


def test_every_vector_is_used() -> None:
    assert len(_cases(JWS)) == JWS["numberOfTests"] == 401
    assert len(_cases(JWK)) == JWK["numberOfTests"]
    assert len(_cases(P1363)) == P1363["numberOfTests"]


def test_json_serialization_vector_exists_and_is_refused() -> None:
    serialized = [t for g in JWS["testGroups"] for t in g["tests"] if t["jws"].startswith("{")]
    assert serialized
    for test in serialized:
        with pytest.raises(TokenRejected) as info:
            verify_jws_signature(test["jws"], KeySet(), typ=None)
        assert info.value.reason is RejectReason.malformed


def test_es256_vectors_include_accepts_and_rejects() -> None:
    es256 = [
        t
        for g in JWS["testGroups"]
        for t in g["tests"]
        if _header_alg(t["jws"]) == "ES256" and _keyset(g) is not None
    ]
    assert {t["result"] for t in es256} == {"valid", "invalid"}


def _p1363_key(group: dict[str, Any]) -> ec.EllipticCurvePublicKey:
    """The group's key; through `KeySet.from_jwks` when the group gives a JWK."""
    point = bytes.fromhex(group["publicKey"]["uncompressed"])
    public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    if "publicKeyJwk" in group:
        keys = KeySet.from_jwks({"keys": [group["publicKeyJwk"]]})
        assert keys[keys.kids[0]] == public_key
    return public_key


def test_p1363_groups_mostly_give_jwks() -> None:
    with_jwk = sum("publicKeyJwk" in g for g in P1363["testGroups"])
    assert with_jwk >= len(P1363["testGroups"]) // 2


@pytest.mark.parametrize(("group", "test"), _cases(P1363))
def test_ecdsa_p1363(group: dict[str, Any], test: dict[str, Any]) -> None:
    public_key = _p1363_key(group)
    signature, message = bytes.fromhex(test["sig"]), bytes.fromhex(test["msg"])
    if test["result"] == "valid":
        verify_es256_signature(public_key, signature, message)
    elif test["result"] == "invalid":
        with pytest.raises(TokenRejected) as info:
            verify_es256_signature(public_key, signature, message)
        assert info.value.reason is RejectReason.bad_signature
    else:  # "acceptable": our choice is whatever OpenSSL decides, but never a crash
        try:
            verify_es256_signature(public_key, signature, message)
        except TokenRejected as exc:
            assert exc.reason is RejectReason.bad_signature
