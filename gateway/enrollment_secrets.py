"""One-time enrollment secrets: generation, salted scrypt hashing, verification.

Owns: making a new secret (URL-safe, 192 random bits), the stored form
`scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`, and verifying a presented secret against
it in constant time. Whether a secret is still unused and unexpired is the
registry's business (`gateway.registry`), not this module's.

Must not: log, store or echo secrets; read clocks or configuration; do I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Final

from gateway.errors import Unauthorized

__all__ = [
    "MAX_SECRET_CHARS",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "SECRET_BYTES",
    "hash_secret",
    "new_secret",
    "verify_secret",
]

SECRET_BYTES: Final = 24
"""Random bytes in a new secret (192 bits; 32 URL-safe characters)."""
# Secrets are 192 random bits, so brute force is hopeless whatever the hash costs; the
# work factor only slows enrollment (2**14 costs 47 ms, 2**10 about 2 ms, 2**4 some
# 30 us here), so a cheap scrypt keeps enrollment bound by the TLS handshake. Stored
# hashes carry their parameters: another cost can be chosen without touching old rows.
SCRYPT_N: Final = 2**4
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
MAX_SECRET_CHARS: Final = 1024
"""Longer presented secrets are refused before any hashing."""

_SCHEME: Final = "scrypt"
_MAX_N: Final = 2**20
_MAXMEM: Final = 256 * 1024 * 1024
_PUBLIC: Final = "invalid enrollment credentials"

# Verified against when the device is unknown, so that case costs the same time.
_DUMMY_SALT: Final = bytes(SALT_BYTES)


SECRET_PREFIX: Final = "gpe_"
"""Marks enrollment secrets (secret scanners can find leaked ones), and keeps a secret
from starting with '-', which command lines would take for an option."""


def new_secret() -> str:
    """A fresh one-time secret to print once and then store only as `hash_secret`."""
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The stored form of `secret`: salted scrypt with its parameters spelled out."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(secret, salt, n, r, p)
    return "$".join((_SCHEME, str(n), str(r), str(p), _b64(salt), _b64(digest)))


def verify_secret(secret: str, stored: str | None) -> None:
    """Raise `Unauthorized` unless `secret` hashes to `stored`.

    Pass `stored=None` for an unknown device: the same scrypt work is done and
    `Unauthorized` raised, so response time does not tell which ids exist. A stored
    value this module cannot read also fails closed with `Unauthorized`.
    """
    if len(secret) > MAX_SECRET_CHARS:
        raise Unauthorized(_PUBLIC, cause="presented secret too long")
    if stored is None:
        _scrypt(secret, _DUMMY_SALT, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        raise Unauthorized(_PUBLIC, cause="no enrollment secret for this device")
    n, r, p, salt, expected = _parse(stored)
    actual = _scrypt(secret, salt, n, r, p, dklen=len(expected))
    if not hmac.compare_digest(actual, expected):
        raise Unauthorized(_PUBLIC, cause="wrong enrollment secret")


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    try:
        scheme, n_text, r_text, p_text, salt_text, hash_text = parts
        n, r, p = int(n_text), int(r_text), int(p_text)
        salt, expected = _unb64(salt_text), _unb64(hash_text)
    except (ValueError, binascii.Error) as exc:
        raise Unauthorized(_PUBLIC, cause="stored secret hash unreadable") from exc
    plausible = (
        scheme == _SCHEME
        and 2 <= n <= _MAX_N
        and n & (n - 1) == 0
        and 1 <= r <= 32
        and 1 <= p <= 16
        and 128 * n * r < _MAXMEM
        and salt
        and 16 <= len(expected) <= 64
    )
    if not plausible:
        raise Unauthorized(_PUBLIC, cause="stored secret hash has unknown parameters")
    return n, r, p, salt, expected


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int, dklen: int = HASH_BYTES) -> bytes:
    return hashlib.scrypt(
        secret.encode("utf-8", "surrogatepass"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=_MAXMEM,
        dklen=dklen,
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
