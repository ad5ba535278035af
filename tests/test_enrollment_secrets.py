"""gateway.enrollment_secrets: generation, the stored form, constant-time verification."""

from __future__ import annotations

import base64
import re

import pytest

from gateway.enrollment_secrets import (
    MAX_SECRET_CHARS,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    hash_secret,
    new_secret,
    verify_secret,
)
from gateway.errors import Unauthorized

FAST = {"n": 2**4, "r": 8, "p": 1}
"""Cheap parameters for tests that are not about the cost."""


def test_new_secret_is_url_safe_and_long() -> None:
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    for secret in secrets:
        assert re.fullmatch(r"gpe_[A-Za-z0-9_-]+", secret)  # never starts with '-'
        body = secret.removeprefix("gpe_")
        assert len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) * 8 >= 128


def test_default_stored_form_and_round_trip() -> None:
    secret = new_secret()
    stored = hash_secret(secret)
    scheme, n, r, p, salt, digest = stored.split("$")
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", SCRYPT_N, SCRYPT_R, SCRYPT_P)
    assert (SCRYPT_N, SCRYPT_R, SCRYPT_P) == (2**4, 8, 1)
    assert len(base64.urlsafe_b64decode(salt + "==")) == 16
    assert len(base64.urlsafe_b64decode(digest + "=")) == 32
    assert secret not in stored
    verify_secret(secret, stored)


def test_hashes_are_salted() -> None:
    assert hash_secret("same", **FAST) != hash_secret("same", **FAST)


@pytest.mark.parametrize("presented", ["guess-123", "", "secret ", "SECRET", "x" * 64])
def test_wrong_secret_is_unauthorized(presented: str) -> None:
    stored = hash_secret("secret", **FAST)
    with pytest.raises(Unauthorized) as info:
        verify_secret(presented, stored)
    assert info.value.public == "invalid enrollment credentials"
    assert presented not in info.value.cause or presented == ""


def test_unknown_device_costs_a_verification_and_fails() -> None:
    with pytest.raises(Unauthorized, match="invalid enrollment credentials") as info:
        verify_secret("anything", None)
    assert "no enrollment secret" in info.value.cause


def test_overlong_secret_is_refused_before_hashing() -> None:
    stored = hash_secret("x", **FAST)
    with pytest.raises(Unauthorized):
        verify_secret("x" * (MAX_SECRET_CHARS + 1), stored)


def test_non_ascii_secret_round_trips() -> None:
    stored = hash_secret("pässwörd\U0001f511", **FAST)
    verify_secret("pässwörd\U0001f511", stored)
    with pytest.raises(Unauthorized):
        verify_secret("passwörd\U0001f511", stored)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plain",
        "bcrypt$16$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$15$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$16$x$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$16$8$1$$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "scrypt$16$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAA",
        "scrypt$16$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAA$extra",
    ],
)
def test_unreadable_stored_hash_fails_closed(stored: str) -> None:
    with pytest.raises(Unauthorized) as info:
        verify_secret("secret", stored)
    assert "stored secret hash" in info.value.cause


def test_parameters_are_read_from_the_stored_form() -> None:
    stored = hash_secret("secret", n=2**5, r=4, p=2)
    assert stored.startswith("scrypt$32$4$2$")
    verify_secret("secret", stored)
