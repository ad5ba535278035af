"""The agent's exception tree for enrollment, tokens and its state directory.

    GatepassError (shared.errors)
    +-- AgentError                 every deliberate agent failure; one line for people
        +-- StateError             the state directory is missing, corrupt or unwritable
        +-- GatewayUnreachable     no TCP/TLS connection to the gateway (network, wrong CA)
        +-- GatewayRefused         the gateway answered with an error (has `status`, `code`)
        |   +-- WrongSecret        EST 401 on simpleenroll
        +-- CertificateMismatch    the certificate returned does not fit our key or name
        +-- ClockSkew              this device's clock is too far from the gateway's

The MQTT link has its own errors (`agent.mqtt_link.LinkError`), and the outbox its own.
"""

from __future__ import annotations

from shared.errors import GatepassError

__all__ = [
    "AgentError",
    "CertificateMismatch",
    "ClockSkew",
    "GatewayRefused",
    "GatewayUnreachable",
    "StateError",
    "WrongSecret",
]


class AgentError(GatepassError):
    """Base of the agent's deliberate errors."""


class StateError(AgentError):
    """The state directory cannot be used as it is."""


class GatewayUnreachable(AgentError):
    """The gateway could not be reached over TLS."""


class GatewayRefused(AgentError):
    """The gateway answered with an HTTP error."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class WrongSecret(GatewayRefused):
    """The enrollment secret was refused (wrong, used, expired, or unknown device)."""


class CertificateMismatch(AgentError):
    """The gateway's certificate does not match our key or device id."""


class ClockSkew(AgentError):
    """The local clock differs from the gateway's by more than the tolerance."""

    def __init__(self, message: str, offset: float) -> None:
        super().__init__(message)
        self.offset = offset
