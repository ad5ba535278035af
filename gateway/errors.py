"""The exception tree of the gateway, split by whose fault it is.

    GatepassError (shared.errors)
    +-- GatewayError
        +-- ClientError              the peer sent something we refuse; has `status`,
        |   |                        `public` (what the client is told) and `cause`
        |   |                        (what the audit log learns)
        |   +-- BadRequest           400 malformed request, CSR, base64, form
        |   +-- Unauthorized         401 missing or wrong credentials
        |   +-- Forbidden            403 policy refusal
        |   +-- NotFound             404
        |   +-- PayloadTooLarge      413
        |   +-- UnsupportedMediaType 415
        |   +-- TooManyRequests      429 (has `retry_after` seconds)
        |   +-- OAuthError           RFC 6749 section 5.2 error (has `error` code)
        +-- RegistryError            the registry refused a change (unknown device, duplicate, ...)
        +-- SessionStoreError        the MQTT session store cannot be used (`gateway.mqtt_sessions`)
        +-- ConfigError              the state directory or configuration is unusable

Must not: render HTTP or MQTT responses (the adapters do that).
"""

from __future__ import annotations

from shared.errors import GatepassError

__all__ = [
    "BadRequest",
    "ClientError",
    "ConfigError",
    "Forbidden",
    "GatewayError",
    "NotFound",
    "OAuthError",
    "PayloadTooLarge",
    "RegistryError",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMediaType",
]


class GatewayError(GatepassError):
    """Base of the gateway's deliberate errors."""


class ClientError(GatewayError):
    """A request refused because of what the client sent or who it is."""

    status = 400

    def __init__(self, public: str, cause: str | None = None) -> None:
        super().__init__(public)
        self.public = public
        self.cause = cause or public


class BadRequest(ClientError):
    status = 400


class Unauthorized(ClientError):
    status = 401


class Forbidden(ClientError):
    status = 403


class NotFound(ClientError):
    status = 404


class PayloadTooLarge(ClientError):
    status = 413


class UnsupportedMediaType(ClientError):
    status = 415


class TooManyRequests(ClientError):
    status = 429

    def __init__(self, public: str, retry_after: float, cause: str | None = None) -> None:
        super().__init__(public, cause)
        self.retry_after = retry_after


class OAuthError(ClientError):
    """An RFC 6749 section 5.2 error: `error` is the code the client sees."""

    def __init__(self, error: str, public: str, cause: str | None = None) -> None:
        super().__init__(public, cause)
        self.error = error
        self.status = 401 if error == "invalid_client" else 400


class RegistryError(GatewayError):
    """The registry refused a change: unknown device, duplicate id, illegal transition."""


class ConfigError(GatewayError):
    """The state directory or configuration cannot be used."""
