"""EST enrollment (RFC 7030): turning a one-time secret or a current certificate into a
device certificate.

Owns: the order of checks for `simpleenroll` and `simplereenroll` (rate limit ->
authenticate -> parse -> policy -> issue -> store atomically -> audit), and what the
audit log learns about each refusal. Must not: speak HTTP (see `gateway.http_api`) or
decide CSR policy (see `gateway.csr_policy`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.authority import issue_device_certificate
from gateway.config import GatewaySettings
from gateway.csr_policy import check_csr, parse_est_body, spki_sha256
from gateway.enrollment_secrets import verify_secret
from gateway.errors import ClientError, Forbidden, RegistryError, TooManyRequests, Unauthorized
from gateway.metrics import GatewayMetrics
from gateway.ratelimit import RateLimiter
from gateway.registry import Registry
from shared.pki import cert_fingerprint, certs_to_pkcs7, load_certificate

__all__ = ["EnrollmentService"]

# Said for every failed secret, so that a caller cannot tell an unknown device from a
# wrong, used or expired secret.
_BAD_SECRET = "unknown device or wrong, used or expired enrollment secret"


class EnrollmentService:
    def __init__(
        self,
        settings: GatewaySettings,
        registry: Registry,
        ca_cert: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._ca_cert = ca_cert
        self._ca_key = ca_key
        self._metrics = metrics
        self._clock = clock
        self._ca_spki = spki_sha256(ca_cert.public_key())
        self._cacerts = certs_to_pkcs7([ca_cert])
        rate = settings.failure_rate_per_minute / 60.0
        self._failures_by_source = RateLimiter(rate, settings.failure_burst)
        self._failures_by_device = RateLimiter(rate, settings.failure_burst)

    def cacerts(self) -> bytes:
        return self._cacerts

    async def enroll(self, device_id: str, secret: str, csr_body: bytes, source: str) -> bytes:
        """`simpleenroll`: the one-time secret buys exactly one certificate."""
        now = self._clock()
        try:
            self._failures_by_source.ensure_available(source, now)
            self._failures_by_device.ensure_available(device_id, now)
            await self._check_secret(device_id, secret, now)
            csr = parse_est_body(csr_body)
            cert = self._issue(csr, device_id, now)
            try:
                self._registry.complete_enrollment(device_id, cert, now, source=source)
            except RegistryError as exc:
                raise Unauthorized(_BAD_SECRET, f"secret no longer usable: {exc}") from exc
        except ClientError as exc:
            self._refused("enroll", device_id, source, exc, now)
            raise
        self._metrics.enrollments.labels(kind="enroll", outcome="issued").inc()
        return certs_to_pkcs7([cert, self._ca_cert])

    async def reenroll(self, peer_der: bytes, csr_body: bytes, source: str) -> bytes:
        """`simplereenroll`: the current, unrevoked certificate buys its successor."""
        now = self._clock()
        device_id = None
        try:
            self._failures_by_source.ensure_available(source, now)
            device_id = self._current_holder(peer_der, now)
            csr = parse_est_body(csr_body)
            cert = self._issue(csr, device_id, now)
            self._registry.add_certificate(device_id, cert, now, source=source)
        except ClientError as exc:
            self._refused("reenroll", device_id, source, exc, now)
            raise
        self._metrics.enrollments.labels(kind="reenroll", outcome="issued").inc()
        return certs_to_pkcs7([cert, self._ca_cert])

    async def _check_secret(self, device_id: str, secret: str, now: float) -> None:
        record = self._registry.enrollment_secret(device_id)
        # Always spend the scrypt time, so that timing tells nothing about which check failed.
        try:
            verify_secret(secret, record.secret_hash if record else None)
        except Unauthorized as exc:
            if record is not None:
                self._registry.record_failed_secret(device_id, now)
            raise Unauthorized(
                _BAD_SECRET, "unknown device" if record is None else "wrong secret"
            ) from exc
        assert record is not None
        if record.used_at is not None:
            raise Unauthorized(_BAD_SECRET, "secret already used")
        if record.expires_at <= now:
            raise Unauthorized(_BAD_SECRET, "secret expired")

    def _current_holder(self, peer_der: bytes, now: float) -> str:
        fingerprint = cert_fingerprint(load_certificate(peer_der)).hex()
        record = self._registry.certificate_by_fingerprint(fingerprint)
        if record is None:
            raise Unauthorized("certificate not issued by this gateway", "unknown certificate")
        if record.revoked_at is not None:
            raise Unauthorized("certificate revoked", "revoked certificate")
        if record.not_after <= now:
            raise Unauthorized("certificate expired", "expired certificate")
        device = self._registry.get_device(record.device_id)
        if device is None or device.status == "revoked":
            raise Unauthorized("device revoked", "revoked device")
        current = self._registry.current_certificate(record.device_id)
        if current is None or current.fingerprint_sha256 != fingerprint:
            raise Unauthorized("certificate superseded by a newer one", "superseded certificate")
        return record.device_id

    def _issue(
        self, csr: x509.CertificateSigningRequest, device_id: str, now: float
    ) -> x509.Certificate:
        check_csr(csr, device_id, forbidden_public_keys={self._ca_spki})
        spki = spki_sha256(csr.public_key())
        if self._registry.spki_in_use_by_other(spki.hex(), device_id):
            raise Forbidden("public key already in use", "public key used by another device")
        return issue_device_certificate(
            csr,
            device_id,
            self._ca_cert,
            self._ca_key,
            datetime.fromtimestamp(now, UTC),
            timedelta(days=self._settings.cert_validity_days),
        )

    def _refused(
        self, kind: str, device_id: str | None, source: str, exc: ClientError, now: float
    ) -> None:
        if isinstance(exc, Unauthorized | Forbidden):
            self._failures_by_source.charge(source, now)
            if device_id:
                self._failures_by_device.charge(device_id, now)
        self._metrics.enrollments.labels(kind=kind, outcome=f"refused_{exc.status}").inc()
        if isinstance(exc, TooManyRequests):
            # Counted, not audited: a client held to the rate limit would otherwise buy a
            # synced registry write, and a row on disk, with every request it sends.
            return
        self._registry.audit(
            kind, "refused", now, device_id=device_id, source=source, detail=exc.cause
        )
