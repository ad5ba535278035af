"""TokenService without sockets: a real registry file, real certificates, real signing.

What the caches must never change: a revocation by another process (the admin CLI) and
a certificate superseded by this process's own re-enrollment are effective on the very
next token request.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.enrollment_secrets import hash_secret, new_secret
from gateway.errors import OAuthError
from gateway.init import initialize
from gateway.registry import Registry
from gateway.runtime import Gateway
from gateway.token_service import TokenResponse, inspect_client_certificate
from shared.acl import default_rules
from shared.pki import build_csr, certs_from_pkcs7, generate_p256_key, x5t_s256
from shared.tokens import TokenVerifier

FORM = {"grant_type": "client_credentials"}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    state = initialize(tmp_path / "gw")
    gw = Gateway.open(state.root)
    try:
        yield gw
    finally:
        gw.close()


def _admin(gw: Gateway) -> Registry:
    """A second connection to the registry file, as the admin CLI has."""
    return Registry.open(gw.state.database)


def _csr(device_id: str) -> bytes:
    csr = build_csr(generate_p256_key(), device_id)
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER))


def _device_cert(body: bytes, device_id: str) -> bytes:
    cert = next(
        c for c in certs_from_pkcs7(body) if c.subject.rfc4514_string() == f"CN={device_id}"
    )
    return cert.public_bytes(serialization.Encoding.DER)


async def _enroll(gw: Gateway, device_id: str) -> bytes:
    secret = new_secret()
    with _admin(gw) as admin:
        admin.add_device(
            device_id, default_rules(), hash_secret(secret), time.time() + 600, time.time()
        )
    body = await gw.enrollment.enroll(device_id, secret, _csr(device_id), "127.0.0.1")
    return _device_cert(body, device_id)


def _refusal(gw: Gateway, der: bytes) -> str:
    with pytest.raises(OAuthError) as info:
        gw.tokens.issue(der, FORM, "127.0.0.1")
    return info.value.public


async def test_issued_token_is_bound_to_the_certificate(gateway: Gateway) -> None:
    der = await _enroll(gateway, "svc-1")
    issued = gateway.tokens.issue(der, FORM, "127.0.0.1")
    verifier = TokenVerifier(
        gateway.snapshot.keyring.verifying,
        issuer=gateway.settings.issuer,
        audience=gateway.settings.audience,
    )
    claims = verifier.verify(issued.access_token, now=time.time())
    assert claims.sub == "svc-1"
    assert claims.cnf.x5t_s256 == x5t_s256(der)
    assert [e.topic for e in claims.acl] == [
        r.topic.replace("{device_id}", "svc-1") for r in default_rules()
    ]


async def test_revocation_by_another_connection_is_effective_on_the_next_request(
    gateway: Gateway,
) -> None:
    der = await _enroll(gateway, "svc-2")
    gateway.tokens.issue(der, FORM, "127.0.0.1")  # now cached
    with _admin(gateway) as admin:
        admin.revoke_device("svc-2", time.time())
    assert _refusal(gateway, der) == "client certificate revoked"


async def test_own_reenrollment_supersedes_the_old_certificate_at_once(gateway: Gateway) -> None:
    old = await _enroll(gateway, "svc-3")
    gateway.tokens.issue(old, FORM, "127.0.0.1")  # now cached
    body = await gateway.enrollment.reenroll(old, _csr("svc-3"), "127.0.0.1")
    new = _device_cert(body, "svc-3")
    assert _refusal(gateway, old) == "certificate superseded"
    assert gateway.tokens.issue(new, FORM, "127.0.0.1").token_type == "Bearer"


async def test_cached_certificate_is_still_refused_after_its_expiry(gateway: Gateway) -> None:
    der = await _enroll(gateway, "svc-4")
    gateway.tokens.issue(der, FORM, "127.0.0.1")
    not_after = x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
    gateway.tokens._clock = lambda: not_after + 1
    assert _refusal(gateway, der) == "client certificate not valid now"


def test_ca_certificate_is_not_a_client(gateway: Gateway) -> None:
    ca = gateway.ca_cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(OAuthError, match="not a device certificate"):
        inspect_client_certificate(ca)


def test_garbage_is_not_a_certificate() -> None:
    with pytest.raises(OAuthError, match="unusable client certificate"):
        inspect_client_certificate(b"\x30\x03garbage")


def test_token_response_body_is_the_rfc_6749_json() -> None:
    body = TokenResponse("eyJh.eyJz.c2ln-_", 300).to_json()
    assert json.loads(body) == {
        "access_token": "eyJh.eyJz.c2ln-_",
        "token_type": "Bearer",
        "expires_in": 300,
    }


@pytest.mark.parametrize("token", ['a"b', "a\\b", "a b", "é", ""])
def test_token_response_refuses_what_would_need_json_escaping(token: str) -> None:
    with pytest.raises(ValueError):
        TokenResponse(token, 300).to_json()
