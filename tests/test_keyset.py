"""Tests of shared.keyset: signing keys, thumbprints, key sets and their JWKS form."""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import PkiError
from shared.keyset import KeySet, SigningKey, jwk_thumbprint

KEY = SigningKey.generate()
OTHER = SigningKey.generate()


def _jwk(key: SigningKey = KEY) -> dict[str, Any]:
    return copy.deepcopy(KeySet.of(key).to_jwks()["keys"][0])


def test_rfc7638_thumbprint_example_3_1_shape() -> None:
    # RFC 7638 3.1 uses an RSA key; for EC we check against a hand-built canonical JSON.
    import hashlib
    import json

    jwk = _jwk()
    canonical = json.dumps(
        {"crv": "P-256", "kty": "EC", "x": jwk["x"], "y": jwk["y"]}, separators=(",", ":")
    )
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest())
    assert jwk_thumbprint(KEY.public_key) == expected.rstrip(b"=").decode()
    assert len(KEY.kid) == 43


def test_thumbprint_matches_joserfc() -> None:
    from joserfc.jwk import ECKey

    assert ECKey.import_key(_jwk()).thumbprint() == KEY.kid


def test_signing_key_generate_and_public_key() -> None:
    assert KEY.kid == jwk_thumbprint(KEY.public_key)
    assert KEY.kid != OTHER.kid
    assert "private_key" not in repr(KEY)


def test_signing_key_rejects_other_curves_and_wrong_kid() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(PkiError):
        SigningKey.from_private_key(p384)
    with pytest.raises(PkiError):
        SigningKey(kid="whatever", private_key=p384)
    with pytest.raises(PkiError):
        SigningKey(kid="not-the-thumbprint", private_key=KEY.private_key)
    with pytest.raises(PkiError):
        SigningKey.from_private_key(ed25519.Ed25519PrivateKey.generate())  # type: ignore[arg-type]
    assert SigningKey(kid=KEY.kid, private_key=KEY.private_key) == KEY


def test_signing_key_is_frozen() -> None:
    with pytest.raises(AttributeError):
        KEY.kid = "x"  # type: ignore[misc]


def test_keyset_mapping_behaviour() -> None:
    keys = KeySet.of(KEY, OTHER)
    assert KEY.kid in keys and "nope" not in keys
    assert keys.get(KEY.kid) == KEY.public_key
    assert keys.get("nope") is None
    assert keys.kids == (KEY.kid, OTHER.kid)
    assert len(keys) == 2 and set(keys) == {KEY.kid, OTHER.kid}
    assert KEY.kid in repr(keys)
    with pytest.raises(AttributeError):
        keys._keys = {}  # type: ignore[misc,unused-ignore]


def test_keyset_with_and_without_return_new_sets() -> None:
    empty = KeySet()
    one = empty.with_key(KEY.kid, KEY.public_key)
    assert len(empty) == 0 and one.kids == (KEY.kid,)
    assert one.with_key(KEY.kid, KEY.public_key) == one
    with pytest.raises(PkiError):
        one.with_key(KEY.kid, OTHER.public_key)
    two = one.with_key(OTHER.kid, OTHER.public_key)
    assert two.without(KEY.kid).kids == (OTHER.kid,)
    assert two.kids == (KEY.kid, OTHER.kid)
    with pytest.raises(KeyError):
        one.without(OTHER.kid)


def test_keyset_rejects_non_p256_and_bad_kids() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(PkiError):
        KeySet({"k": p384})
    with pytest.raises(PkiError):
        KeySet({"": KEY.public_key})
    with pytest.raises(PkiError):
        KeySet({"k": ed25519.Ed25519PrivateKey.generate().public_key()})  # type: ignore[dict-item]


def test_jwks_round_trip() -> None:
    keys = KeySet.of(KEY, OTHER)
    jwks = keys.to_jwks()
    for jwk in jwks["keys"]:
        assert set(jwk) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
        assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")
        assert len(jwk["x"]) == len(jwk["y"]) == 43
    assert KeySet.from_jwks(jwks) == keys


def test_from_jwks_accepts_minimal_and_key_ops() -> None:
    jwk = _jwk()
    for member in ("alg", "use"):
        del jwk[member]
    jwk["key_ops"] = ["verify"]
    assert KeySet.from_jwks({"keys": [jwk]}).kids == (KEY.kid,)


def _mutated(**changes: Any) -> dict[str, Any]:
    jwk = _jwk()
    for name, value in changes.items():
        if value is None:
            jwk.pop(name, None)
        else:
            jwk[name] = value
    return {"keys": [jwk]}


P384_JWK = {
    "kty": "EC",
    "crv": "P-384",
    "x": "AAAA",
    "y": "AAAA",
    "kid": "p384",
}


@pytest.mark.parametrize(
    "jwks",
    [
        _mutated(d=base64.urlsafe_b64encode(b"\x01" * 32).rstrip(b"=").decode()),
        _mutated(k="secret"),
        _mutated(kty="RSA"),
        _mutated(kty=None),
        _mutated(crv="P-384"),
        _mutated(crv="secp256k1"),
        _mutated(alg="ES384"),
        _mutated(alg="HS256"),
        _mutated(use="enc"),
        _mutated(key_ops=["encrypt"]),
        _mutated(key_ops="verify"),
        _mutated(kid=None),
        _mutated(kid=""),
        _mutated(kid=7),
        _mutated(x=None),
        _mutated(x=_jwk()["x"] + "="),
        _mutated(x=_jwk()["x"][:-1]),
        _mutated(x=_jwk()["x"] + "AAAA"),
        _mutated(x=_jwk()["x"].replace(_jwk()["x"][5], "+")),
        _mutated(y=7),
        _mutated(y="A" * 42 + "B"),  # non-canonical: unused bits set
        _mutated(y=_jwk()["x"]),  # (x, x) is not on the curve
        _mutated(x5c=["MIIB"]),
        _mutated(unknown="member"),
        {"keys": [_jwk(), _jwk()]},  # duplicate kid
        {"keys": [P384_JWK]},
        {"keys": "nope"},
        {"keys": ["nope"]},
        {"keys": [], "extra": 1},
        {},
        [],
    ],
)
def test_from_jwks_is_strict(jwks: Any) -> None:
    with pytest.raises(PkiError):
        KeySet.from_jwks(jwks)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["kty", "crv", "x", "y", "kid", "alg", "use", "key_ops", "d"]),
        st.one_of(st.text(max_size=50), st.integers(), st.none(), st.lists(st.text(max_size=8))),
    )
)
def test_from_jwks_fuzz_only_raises_pki_error(jwk: dict[str, Any]) -> None:
    try:
        KeySet.from_jwks({"keys": [jwk]})
    except PkiError:
        pass
