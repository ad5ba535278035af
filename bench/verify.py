"""Microbenchmark: cost of verifying one Gatepass access token, against its baselines.

Prints one JSON object, microseconds per verification (median of several rounds, all
measured in the same run on the same token):

* ``raw_ecdsa_us``: `cryptography` ECDSA P-256 verify of the token's signature alone;
* ``pyjwt_us``: PyJWT `jwt.decode` with a key object and full validation (aud, iss,
  required exp/iat/nbf);
* ``ours_uncached_us``: `TokenVerifier.verify` with `cache_size=0` (every check runs,
  strictly more than PyJWT does);
* ``ours_cached_us``: `TokenVerifier.verify` on a cache hit;

and the ratios ``ours_over_pyjwt``, ``ours_over_raw``, ``cached_over_uncached``.
Budgets (see the task): ours_uncached <= pyjwt; cached <= 10 us.

Run: ``.venv/bin/python bench/verify.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from shared.claims import AclEntry
from shared.keyset import KeySet, SigningKey
from shared.tokens import TokenVerifier, mint_access_token, new_access_token_claims

__all__ = ["main", "measure_us"]

ROUNDS = 7
SLOW_CALLS = 2_000
FAST_CALLS = 200_000
ISSUER = "https://gatepass.example"
AUDIENCE = "gatepass-mqtt"


def measure_us(call: Callable[[], object], calls: int, rounds: int = ROUNDS) -> float:
    """Median over `rounds` of the mean time of one `call()`, in microseconds."""
    call()  # warm up
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def _token(key: SigningKey, now: float) -> str:
    acl = [
        AclEntry(permission="deny", action="all", topic="devices/dev-1/secret/#"),
        AclEntry(permission="allow", action="publish", topic="devices/dev-1/#"),
        AclEntry(permission="allow", action="subscribe", topic="devices/dev-1/commands/#"),
    ]
    claims = new_access_token_claims(
        device_id="dev-1",
        acl=acl,
        cert_thumbprint="q" * 42 + "A",
        issuer=ISSUER,
        audience=AUDIENCE,
        lifetime=3600,
        now=now,
    )
    return mint_access_token(claims, key)


def _raw_ecdsa(key: SigningKey, token: str) -> Callable[[], object]:
    signing_input, _, sig_b64 = token.rpartition(".")
    sig = jwt.utils.base64url_decode(sig_b64)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    message = signing_input.encode("ascii")
    public_key = key.public_key
    algorithm = ec.ECDSA(hashes.SHA256())
    return lambda: public_key.verify(der, message, algorithm)


def _pyjwt(key: SigningKey, token: str) -> Callable[[], object]:
    public_key = key.public_key
    options: Any = {"require": ["exp", "iat", "nbf"]}
    return lambda: jwt.decode(
        token,
        public_key,
        algorithms=["ES256"],
        audience=AUDIENCE,
        issuer=ISSUER,
        options=options,
    )


def main() -> None:
    key = SigningKey.generate()
    now = time.time()  # PyJWT reads the clock itself, so the token must be current
    token = _token(key, now)
    keys = KeySet.of(key)
    uncached = TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE, cache_size=0)
    cached = TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE)
    assert uncached.verify(token, now) == cached.verify(token, now)

    raw = measure_us(_raw_ecdsa(key, token), SLOW_CALLS)
    pyjwt = measure_us(_pyjwt(key, token), SLOW_CALLS)
    ours = measure_us(lambda: uncached.verify(token, now), SLOW_CALLS)
    hit = measure_us(lambda: cached.verify(token, now), FAST_CALLS)
    print(
        json.dumps(
            {
                "token_bytes": len(token),
                "raw_ecdsa_us": round(raw, 2),
                "pyjwt_us": round(pyjwt, 2),
                "ours_uncached_us": round(ours, 2),
                "ours_cached_us": round(hit, 3),
                "ours_over_pyjwt": round(ours / pyjwt, 3),
                "ours_over_raw": round(ours / raw, 3),
                "cached_over_uncached": round(hit / ours, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
