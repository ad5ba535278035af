"""`TokenTemplate`: the token service's fast path must mint exactly what the slow one does.

The template validates and serializes a certificate's fixed claims once and appends the
changing ones (`iat`, `nbf`, `exp`, `jti`) per token; every token it mints must verify
to the same claims `new_access_token_claims` builds for the same moment.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from pydantic import ValidationError

from shared.claims import AclEntry
from shared.keyset import KeySet, SigningKey
from shared.tokens import TokenTemplate, TokenVerifier, new_access_token_claims
from tests.test_tokens import ACL, AUD, ISS, KEY, NOW, T0, THUMB

FIXED: dict[str, Any] = {
    "device_id": "dev-1",
    "acl": ACL,
    "cert_thumbprint": THUMB,
    "issuer": ISS,
    "audience": AUD,
    "lifetime": 300,
    "scope": "rabbitmq.write:*/*",
}


def verify(token: str, now: float = NOW, key: SigningKey = KEY) -> Any:
    return TokenVerifier(KeySet.of(key), issuer=ISS, audience=AUD).verify(token, now)


def test_template_mints_what_the_one_off_path_builds() -> None:
    minted = TokenTemplate(**FIXED, not_after=NOW + 3600).mint(KEY, NOW + 0.7)
    got = verify(minted.token)
    expected = new_access_token_claims(**FIXED, now=NOW + 0.7, not_after=NOW + 3600)
    assert got.model_copy(update={"jti": expected.jti}) == expected
    assert (minted.iat, minted.exp) == (T0, T0 + 300) == (got.iat, got.exp)


def test_every_token_gets_its_own_jti_and_its_own_times() -> None:
    template = TokenTemplate(**FIXED)
    first, later = template.mint(KEY, NOW), template.mint(KEY, NOW + 42)
    a, b = verify(first.token), verify(later.token, NOW + 42)
    assert a.jti != b.jti
    assert len(base64.urlsafe_b64decode(a.jti + "==")) == 16
    assert (b.iat, b.nbf, b.exp) == (T0 + 42, T0 + 42, T0 + 342)


def test_header_names_the_signing_key() -> None:
    token = TokenTemplate(**FIXED).mint(KEY, NOW).token
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": KEY.kid}
    other = SigningKey.generate()
    assert verify(TokenTemplate(**FIXED).mint(other, NOW).token, key=other).sub == "dev-1"


def test_exp_never_passes_the_certificate() -> None:
    template = TokenTemplate(**FIXED, not_after=NOW + 60.5)
    assert verify(template.mint(KEY, NOW).token).exp == T0 + 60
    with pytest.raises(ValueError, match="expires"):
        template.mint(KEY, NOW + 60.2)  # the certificate ends within this second


@pytest.mark.parametrize(
    "bad",
    [{"device_id": ""}, {"issuer": ""}, {"audience": ()}, {"cert_thumbprint": "short"}],
)
def test_fixed_claims_are_validated_once_up_front(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TokenTemplate(**{**FIXED, **bad})


def test_impossible_lifetime_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="lifetime"):
        TokenTemplate(**{**FIXED, "lifetime": 0})


def test_a_token_verifiers_would_reject_as_too_large_is_not_minted() -> None:
    acl = [
        AclEntry(permission="allow", action="all", topic=f"devices/dev-1/t{i}") for i in range(100)
    ]
    template = TokenTemplate(**{**FIXED, "acl": acl})
    with pytest.raises(ValueError, match="bytes"):
        template.mint(KEY, NOW)
