"""Compact JWS as the simulator handles it: read a token unverified, forge bad ones.

Owns: splitting a compact JWS into its header, claims and signature segment without
verifying anything (`jws_parts`, `token_kid`), and building tokens the gateway must
refuse: claims under a signature of our choosing (`compact_jws`), HS256 keyed with a
public key (`sign_hs256`), ES256 with a key the simulator read from the gateway's state
directory (`sign_es256`), and the public key of a JWK (`jwk_public_key`).
Must not: verify tokens or decide whether one is good (`shared.tokens` does, for the
gateway); talk to the network; be used to build tokens for honest devices.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = [
    "compact_jws",
    "jwk_public_key",
    "jws_parts",
    "sign_es256",
    "sign_hs256",
    "token_kid",
]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_json(segment: str) -> dict[str, Any]:
    data = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    if not isinstance(data, dict):
        raise ValueError("a JWT segment is not a JSON object")
    return data


def compact_jws(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes) -> str:
    compact = json.dumps(dict(header), separators=(",", ":")).encode()
    body = json.dumps(dict(claims), separators=(",", ":")).encode()
    return f"{_b64url(compact)}.{_b64url(body)}.{_b64url(signature)}"


def jws_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Header, claims and the signature segment of a compact JWS (not verified)."""
    header, claims, signature = token.split(".")
    return _b64url_json(header), _b64url_json(claims), signature


def token_kid(token: str | None) -> str | None:
    """The `kid` in a token's header (None for no token or an unreadable one)."""
    if token is None:
        return None
    try:
        kid = jws_parts(token)[0].get("kid")
    except ValueError:
        return None
    return str(kid) if kid is not None else None


def jwk_public_key(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    def coordinate(name: str) -> int:
        value = str(jwk[name])
        return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")

    numbers = ec.EllipticCurvePublicNumbers(coordinate("x"), coordinate("y"), ec.SECP256R1())
    return numbers.public_key()


def sign_hs256(header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes) -> str:
    unsigned = compact_jws(header, claims, b"").rsplit(".", 1)[0]
    mac = hmac.new(secret, unsigned.encode("ascii"), hashlib.sha256).digest()
    return f"{unsigned}.{_b64url(mac)}"


def sign_es256(
    header: Mapping[str, Any], claims: Mapping[str, Any], key: ec.EllipticCurvePrivateKey
) -> str:
    unsigned = compact_jws(header, claims, b"").rsplit(".", 1)[0]
    der = key.sign(unsigned.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{unsigned}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
