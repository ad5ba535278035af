"""The OAuth 2.0 token endpoint's logic: client credentials over mutual TLS.

Owns: authenticating a client by its certificate (RFC 8705 `tls_client_auth`),
checking the token request (RFC 6749 section 4.4), rate limits, and minting the
certificate-bound RFC 9068 token with the device's ACL. Must not: speak HTTP or hold
keys beyond the snapshot it is handed (`KeyRing`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.config import GatewaySettings
from gateway.errors import ClientError, OAuthError, TooManyRequests
from gateway.keyring import KeyRing
from gateway.metrics import GatewayMetrics
from gateway.rabbitmq import token_claims as rabbitmq_token_claims
from gateway.ratelimit import RateLimiter
from gateway.registry import DeviceRecord, Registry
from shared.acl import expand_placeholders
from shared.claims import AclEntry
from shared.errors import PkiError
from shared.pki import b64url, load_certificate
from shared.tokens import TokenTemplate

__all__ = [
    "ClientCertificate",
    "Grant",
    "TokenResponse",
    "TokenService",
    "inspect_client_certificate",
]

log = logging.getLogger("gatepass.tokens")

_JWS_CHARACTERS = re.compile(r"[A-Za-z0-9_.-]+")

# Bounds on the caches below: a fleet's worth of certificates and grants, never more.
CERT_CACHE_SIZE = 16384
GRANT_CACHE_SIZE = 16384


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """What the token service needs of a client certificate, derived once per DER."""

    fingerprint_hex: str
    x5t_s256: str
    not_before: float
    not_after: float


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """A successful token response (RFC 6749 section 5.1)."""

    access_token: str
    expires_in: int
    token_type: str = "Bearer"

    def to_json(self) -> bytes:
        """The response body. Formatted, not `json.dumps`ed: a compact JWS is base64url
        and dots, so nothing in it needs escaping, and scanning ~600 characters for
        escapes was a tenth of the endpoint's own cost."""
        if not _JWS_CHARACTERS.fullmatch(self.access_token):
            raise ValueError("access_token is not a compact JWS")
        return b'{"access_token":"%s","token_type":"%s","expires_in":%d}' % (
            self.access_token.encode("ascii"),
            self.token_type.encode("ascii"),
            self.expires_in,
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """An active device's token for one certificate, as the registry stood at `generation`."""

    device_id: str
    template: TokenTemplate


class TokenService:
    """Issues tokens; caches what it read from the registry until the registry changes.

    Every request still checks the registry's `generation()` (one PRAGMA), so a
    revocation by the admin CLI or a re-enrollment is effective on the very next
    request, without the three queries and the certificate parsing per token.
    """

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
        self._grants: dict[str, Grant] = {}
        self._grants_generation: tuple[int, int] | None = None

    def issue(self, peer_der: bytes | None, form: Mapping[str, str], source: str) -> TokenResponse:
        """Authenticate, check, rate-limit and mint; refusals raise `ClientError`."""
        started = time.perf_counter()
        now = self._clock()
        try:
            self._failures_by_source.ensure_available(source, now)
            cert = _client_certificate(peer_der, now)
            grant = self._grant(cert)
            _check_request(form, grant.device_id)
            self._per_device.check(grant.device_id, now)
            response = self._mint(grant, now)
        except ClientError as exc:
            self._refused(exc, source, now)
            raise
        self._metrics.tokens_issued.inc()
        self._metrics.token_latency.observe(time.perf_counter() - started)
        return response

    def _grant(self, cert: ClientCertificate) -> Grant:
        generation = self._registry.generation()
        if generation != self._grants_generation or len(self._grants) >= GRANT_CACHE_SIZE:
            self._grants = {}
            self._grants_generation = generation
        grant = self._grants.get(cert.fingerprint_hex)
        if grant is None:
            grant = self._load_grant(cert)
            self._grants[cert.fingerprint_hex] = grant
        return grant

    def _load_grant(self, cert: ClientCertificate) -> Grant:
        """The registry's word on a certificate: known, not revoked, current, device active."""
        record = self._registry.certificate_by_fingerprint(cert.fingerprint_hex)
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
        return self._grant_for(device, cert)

    def _grant_for(self, device: DeviceRecord, cert: ClientCertificate) -> Grant:
        acl = expand_placeholders(device.acl, device.id)
        audience, scope = rabbitmq_token_claims(self._settings, device.id, acl)
        template = TokenTemplate(
            device_id=device.id,
            acl=(AclEntry.model_validate(r.model_dump()) for r in acl),
            scope=scope,
            cert_thumbprint=cert.x5t_s256,
            issuer=self._settings.issuer,
            audience=audience,
            lifetime=self._settings.token_lifetime,
            not_after=cert.not_after,
        )
        return Grant(device.id, template)

    def _mint(self, grant: Grant, now: float) -> TokenResponse:
        try:
            minted = grant.template.mint(self._keyring().signing, now)
        except ValueError as exc:  # the certificate ends within the second
            reason = "client certificate not valid now"
            raise OAuthError("invalid_client", reason, str(exc)) from exc
        return TokenResponse(minted.token, minted.exp - minted.iat)

    def _refused(self, exc: ClientError, source: str, now: float) -> None:
        reason = exc.error if isinstance(exc, OAuthError) else type(exc).__name__.lower()
        if isinstance(exc, OAuthError) and exc.error == "invalid_client":
            self._failures_by_source.charge(source, now)
        self._metrics.tokens_refused.labels(reason=reason).inc()
        if not isinstance(exc, TooManyRequests):  # a flood is counted, not logged
            log.info("token refused to %s: %s %r", source, reason, exc.cause)


def _client_certificate(peer_der: bytes | None, now: float) -> ClientCertificate:
    if not peer_der:
        raise OAuthError("invalid_client", "client certificate required", "no certificate")
    cert = inspect_client_certificate(peer_der)
    if not cert.not_before <= now < cert.not_after:
        raise OAuthError("invalid_client", "client certificate not valid now", "cert validity")
    return cert


@functools.lru_cache(maxsize=CERT_CACHE_SIZE)
def inspect_client_certificate(der: bytes) -> ClientCertificate:
    """Parse a client certificate and insist on a client-auth leaf (refusals raise).

    The TLS layer verified the chain. Pure function of the DER bytes, hence cached:
    a device presents the same certificate for every token until it renews.
    """
    try:
        cert = load_certificate(der)
    except PkiError as exc:
        raise OAuthError("invalid_client", "unusable client certificate", str(exc)) from exc
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise OAuthError("invalid_client", "not a device certificate", str(exc)) from exc
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku or basic.ca:
        raise OAuthError("invalid_client", "not a device certificate", "EKU or CA flag")
    digest = hashlib.sha256(der).digest()
    return ClientCertificate(
        fingerprint_hex=digest.hex(),
        x5t_s256=b64url(digest),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def _check_request(form: Mapping[str, str], device_id: str) -> None:
    grant = form.get("grant_type")
    if not grant:
        raise OAuthError("invalid_request", "grant_type is required")
    if grant != "client_credentials":
        raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
    client_id = form.get("client_id")
    if client_id is not None and client_id != device_id:
        raise OAuthError("invalid_client", "client_id does not match the certificate")
