"""The OAuth 2.0 token endpoint's logic: client credentials over mutual TLS.

Owns: authenticating a client by its certificate (RFC 8705 `tls_client_auth`),
checking the token request (RFC 6749 section 4.4), rate limits, and minting the
certificate-bound RFC 9068 token with the device's ACL. Must not: speak HTTP or hold
keys beyond the snapshot it is handed (`KeyRing`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.config import GatewaySettings
from gateway.errors import ClientError, OAuthError
from gateway.keyring import KeyRing
from gateway.metrics import GatewayMetrics
from gateway.rabbitmq import token_claims as rabbitmq_token_claims
from gateway.ratelimit import RateLimiter
from gateway.registry import DeviceRecord, Registry
from shared.acl import expand_placeholders
from shared.claims import AclEntry
from shared.errors import PkiError
from shared.pki import cert_fingerprint, load_certificate, x5t_s256
from shared.tokens import mint_access_token, new_access_token_claims

__all__ = ["TokenService"]


class TokenService:
    def __init__(
        self,
        settings: GatewaySettings,
        registry: Registry,
        keyring: Callable[[], KeyRing],
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._keyring = keyring
        self._metrics = metrics
        self._clock = clock
        self._per_device = RateLimiter(settings.token_rate_per_minute / 60.0, settings.token_burst)
        rate = settings.failure_rate_per_minute / 60.0
        self._failures_by_source = RateLimiter(rate, settings.failure_burst)

    def issue(self, peer_der: bytes | None, form: Mapping[str, str], source: str) -> dict[str, Any]:
        """Authenticate, check, rate-limit and mint; refusals raise `ClientError`."""
        started = time.perf_counter()
        now = self._clock()
        try:
            self._failures_by_source.ensure_available(source, now)
            device, cert = self._authenticate(peer_der, now)
            _check_request(form, device.id)
            self._per_device.check(device.id, now)
            response = self._mint(device, cert, peer_der or b"", now)
        except ClientError as exc:
            self._refused(exc, source, now)
            raise
        self._metrics.tokens_issued.inc()
        self._metrics.token_latency.observe(time.perf_counter() - started)
        return response

    def _authenticate(
        self, peer_der: bytes | None, now: float
    ) -> tuple[DeviceRecord, x509.Certificate]:
        if not peer_der:
            raise OAuthError("invalid_client", "client certificate required", "no certificate")
        try:
            cert = load_certificate(peer_der)
        except PkiError as exc:
            raise OAuthError("invalid_client", "unusable client certificate", str(exc)) from exc
        _check_client_certificate(cert, now)
        record = self._registry.certificate_by_fingerprint(cert_fingerprint(cert).hex())
        if record is None:
            raise OAuthError("invalid_client", "unknown client certificate", "unknown cert")
        if record.revoked_at is not None:
            raise OAuthError("invalid_client", "client certificate revoked", "revoked cert")
        device = self._registry.get_device(record.device_id)
        if device is None or device.status != "enrolled":
            raise OAuthError("invalid_client", "device not active", "device not enrolled")
        current = self._registry.current_certificate(record.device_id)
        if current is None or current.fingerprint_sha256 != record.fingerprint_sha256:
            raise OAuthError("invalid_client", "certificate superseded", "superseded cert")
        return device, cert

    def _mint(
        self, device: DeviceRecord, cert: x509.Certificate, der: bytes, now: float
    ) -> dict[str, Any]:
        device_id = device.id
        ring = self._keyring()
        not_after = cert.not_valid_after_utc.timestamp()
        acl = expand_placeholders(device.acl, device_id)
        audience, scope = rabbitmq_token_claims(self._settings, device_id, acl)
        claims = new_access_token_claims(
            device_id=device_id,
            acl=[AclEntry.model_validate(r.model_dump()) for r in acl],
            scope=scope,
            cert_thumbprint=x5t_s256(der),
            issuer=self._settings.issuer,
            audience=audience,
            lifetime=self._settings.token_lifetime,
            now=now,
            not_after=not_after,
        )
        token = mint_access_token(claims, ring.signing)
        return {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": claims.exp - claims.iat,
        }

    def _refused(self, exc: ClientError, source: str, now: float) -> None:
        reason = exc.error if isinstance(exc, OAuthError) else type(exc).__name__.lower()
        if isinstance(exc, OAuthError) and exc.error == "invalid_client":
            self._failures_by_source.charge(source, now)
        self._metrics.tokens_refused.labels(reason=reason).inc()


def _check_client_certificate(cert: x509.Certificate, now: float) -> None:
    """The TLS layer verified the chain; also insist on a current client-auth leaf."""
    if not cert.not_valid_before_utc.timestamp() <= now < cert.not_valid_after_utc.timestamp():
        raise OAuthError("invalid_client", "client certificate not valid now", "cert validity")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise OAuthError("invalid_client", "not a device certificate", str(exc)) from exc
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku or basic.ca:
        raise OAuthError("invalid_client", "not a device certificate", "EKU or CA flag")


def _check_request(form: Mapping[str, str], device_id: str) -> None:
    grant = form.get("grant_type")
    if not grant:
        raise OAuthError("invalid_request", "grant_type is required")
    if grant != "client_credentials":
        raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
    client_id = form.get("client_id")
    if client_id is not None and client_id != device_id:
        raise OAuthError("invalid_client", "client_id does not match the certificate")
