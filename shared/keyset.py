"""Token signing keys and the public key set that verifies them (ES256 / P-256 only).

Owns: `SigningKey` (a P-256 private key named by its RFC 7638 thumbprint), `KeySet`
(an immutable kid -> P-256 public key mapping), the JWK Set wire form of that mapping
(RFC 7517, as served at `/.well-known/jwks.json`) and `jwk_thumbprint`.
Must not: read or write files, fetch key sets over the network, log key material,
or know anything about tokens beyond "ES256 signing key".

Every malformed or unusable key raises `shared.errors.PkiError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from shared.errors import PkiError

__all__ = ["KeySet", "SigningKey", "jwk_thumbprint"]

_COORDINATE_BYTES: Final = 32
# Canonical unpadded base64url of exactly 32 bytes: 42 free characters, then one whose
# two low bits are zero (the encoding's unused bits).
_COORDINATE_RE: Final = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
_JWK_MEMBERS: Final = frozenset({"kty", "crv", "x", "y", "kid", "alg", "use", "key_ops"})
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _require_p256_public(public_key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise PkiError("only P-256 public keys are supported")
    return public_key


def _coordinates(public_key: ec.EllipticCurvePublicKey) -> tuple[str, str]:
    numbers = public_key.public_numbers()
    return (
        _b64url(numbers.x.to_bytes(_COORDINATE_BYTES, "big")),
        _b64url(numbers.y.to_bytes(_COORDINATE_BYTES, "big")),
    )


def jwk_thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint (base64url SHA-256) of a P-256 public key."""
    x, y = _coordinates(_require_p256_public(public_key))
    # RFC 7638 section 3.2: required members only, lexicographic order, no whitespace.
    canonical = json.dumps(
        {"crv": "P-256", "kty": "EC", "x": x, "y": y}, separators=(",", ":"), sort_keys=True
    )
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


@dataclass(frozen=True, slots=True, kw_only=True)
class SigningKey:
    """An ES256 signing key; `kid` is always the thumbprint of its public key."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            self.private_key.curve, ec.SECP256R1
        ):
            raise PkiError("signing keys must be P-256 private keys")
        if self.kid != jwk_thumbprint(self.private_key.public_key()):
            raise PkiError("kid must be the RFC 7638 thumbprint of the key")

    @classmethod
    def from_private_key(cls, private_key: ec.EllipticCurvePrivateKey) -> SigningKey:
        """Wrap an existing P-256 key, naming it by its thumbprint."""
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise PkiError("signing keys must be P-256 private keys")
        public_key = _require_p256_public(private_key.public_key())
        return cls(kid=jwk_thumbprint(public_key), private_key=private_key)

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random P-256 signing key."""
        return cls.from_private_key(ec.generate_private_key(ec.SECP256R1()))

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()


class KeySet(Mapping[str, ec.EllipticCurvePublicKey]):
    """Immutable mapping kid -> P-256 public key. Changes return a new set."""

    __slots__ = ("_keys",)
    _keys: dict[str, ec.EllipticCurvePublicKey]

    def __init__(self, keys: Mapping[str, ec.EllipticCurvePublicKey] | None = None) -> None:
        checked: dict[str, ec.EllipticCurvePublicKey] = {}
        for kid, public_key in (keys or {}).items():
            if not isinstance(kid, str) or not kid:
                raise PkiError("kid must be a non-empty string")
            checked[kid] = _require_p256_public(public_key)
        object.__setattr__(self, "_keys", checked)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("KeySet is immutable")

    @classmethod
    def of(cls, *signing_keys: SigningKey) -> KeySet:
        """The public halves of some signing keys, under their kids."""
        return cls({key.kid: key.public_key for key in signing_keys})

    def __getitem__(self, kid: str) -> ec.EllipticCurvePublicKey:
        return self._keys[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __repr__(self) -> str:
        return f"KeySet(kids={self.kids!r})"

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def with_key(self, kid: str, public_key: ec.EllipticCurvePublicKey) -> KeySet:
        """A new set that also holds `public_key` under `kid`.

        Re-adding the same key is a no-op; binding a kid to a different key raises.
        """
        existing = self._keys.get(kid)
        if existing is not None and existing != public_key:
            raise PkiError(f"kid {kid!r} is already bound to a different key")
        return KeySet({**self._keys, kid: public_key})

    def without(self, kid: str) -> KeySet:
        """A new set without `kid`; raises KeyError if it is absent."""
        if kid not in self._keys:
            raise KeyError(kid)
        return KeySet({k: v for k, v in self._keys.items() if k != kid})

    def to_jwks(self) -> dict[str, list[dict[str, str]]]:
        """The RFC 7517 JWK Set of the public keys."""
        keys = []
        for kid, public_key in self._keys.items():
            x, y = _coordinates(public_key)
            keys.append(
                {
                    "kty": "EC",
                    "crv": "P-256",
                    "x": x,
                    "y": y,
                    "kid": kid,
                    "alg": "ES256",
                    "use": "sig",
                }
            )
        return {"keys": keys}

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> KeySet:
        """Parse a JWK Set strictly: P-256 verification keys only, no private members."""
        if not isinstance(jwks, Mapping) or set(jwks) != {"keys"}:
            raise PkiError("a JWK Set is an object with exactly one member, 'keys'")
        entries = jwks["keys"]
        if not isinstance(entries, list):
            raise PkiError("'keys' must be an array")
        parsed: dict[str, ec.EllipticCurvePublicKey] = {}
        for entry in entries:
            kid, public_key = _parse_jwk(entry)
            if kid in parsed:
                raise PkiError(f"duplicate kid {kid!r} in JWK Set")
            parsed[kid] = public_key
        return cls(parsed)


def _parse_jwk(jwk: object) -> tuple[str, ec.EllipticCurvePublicKey]:
    if not isinstance(jwk, Mapping):
        raise PkiError("a JWK must be an object")
    members = set(jwk)
    if members & _PRIVATE_MEMBERS:
        raise PkiError("JWK Set must not contain private key members")
    if not members <= _JWK_MEMBERS:
        raise PkiError(f"unsupported JWK members: {sorted(members - _JWK_MEMBERS)}")
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise PkiError("only EC P-256 keys are supported")
    if jwk.get("alg", "ES256") != "ES256" or jwk.get("use", "sig") != "sig":
        raise PkiError("key is not an ES256 signature key")
    key_ops = jwk.get("key_ops", ["verify"])
    if not isinstance(key_ops, list) or "verify" not in key_ops:
        raise PkiError("key_ops does not allow 'verify'")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise PkiError("a JWK needs a non-empty string kid")
    x, y = _decode_coordinate(jwk.get("x")), _decode_coordinate(jwk.get("y"))
    try:
        public_key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    except ValueError as exc:
        raise PkiError("JWK point is not on P-256") from exc
    return kid, public_key


def _decode_coordinate(value: object) -> int:
    if not isinstance(value, str) or _COORDINATE_RE.fullmatch(value) is None:
        raise PkiError("EC coordinates must be unpadded base64url of 32 bytes")
    try:
        raw = base64.urlsafe_b64decode(value + "=")
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - regex guarantees
        raise PkiError("bad base64url in JWK") from exc
    return int.from_bytes(raw, "big")
