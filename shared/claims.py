"""The claims of a Gatepass access token (RFC 9068 profile) as a value that cannot be invalid.

Owns: `AccessTokenClaims` and its parts, `Confirmation` (RFC 8705 `cnf`) and `AclEntry`
(one EMQX-style `acl` entry), their strict validation and their JSON form.
Must not: sign, verify or parse tokens (that is `shared.tokens`), read the clock, or
decide whether an ACL allows an action (that is `shared.acl`).

Validation is strict: numeric dates are JSON integers (never strings, booleans or
floats), unknown claims are refused, and `client_id` must equal `sub` (a device is
its own OAuth client).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from shared.topics import validate_topic_filter

__all__ = ["AccessTokenClaims", "AclEntry", "Confirmation", "NumericDate"]

# Seconds since the epoch, as JSON integers; bounded so that they survive any JSON
# consumer (2**53) and can never be negative.
NumericDate = Annotated[int, Field(ge=0, lt=2**53)]

# Canonical unpadded base64url of exactly 32 bytes (the last character carries two
# unused bits, which must be zero).
_THUMBPRINT_PATTERN: Final = r"^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$"

_NonEmpty = Annotated[str, Field(min_length=1)]
# Only wire names are accepted: `cnf` must say `x5t#S256`, never `x5t_s256`.
_STRICT: Final = ConfigDict(frozen=True, extra="forbid", strict=True)


def _check_topic_filter(topic: str) -> str:
    validate_topic_filter(topic)  # raises InvalidTopic, a ValueError
    return topic


_TopicFilter = Annotated[str, AfterValidator(_check_topic_filter)]


class AclEntry(BaseModel):
    """One `acl` entry, JSON `{"permission": ..., "action": ..., "topic": ...}`."""

    model_config = _STRICT

    permission: Literal["allow", "deny"]
    action: Literal["publish", "subscribe", "all"]
    topic: _TopicFilter


class Confirmation(BaseModel):
    """RFC 8705 `cnf`: the SHA-256 thumbprint of the client certificate (`x5t#S256`)."""

    model_config = _STRICT

    x5t_s256: str = Field(alias="x5t#S256", pattern=_THUMBPRINT_PATTERN)


class AccessTokenClaims(BaseModel):
    """The payload of a Gatepass access token."""

    model_config = _STRICT

    iss: _NonEmpty
    sub: _NonEmpty
    aud: _NonEmpty | Annotated[tuple[_NonEmpty, ...], Field(min_length=1)]
    client_id: _NonEmpty
    iat: NumericDate
    nbf: NumericDate
    exp: NumericDate
    jti: _NonEmpty
    cnf: Confirmation
    acl: tuple[AclEntry, ...]
    scope: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> AccessTokenClaims:
        if self.client_id != self.sub:
            raise ValueError("client_id must equal sub")
        if self.exp <= self.iat:
            raise ValueError("exp must be after iat")
        if self.nbf > self.exp:
            raise ValueError("nbf must not be after exp")
        return self

    @property
    def audiences(self) -> tuple[str, ...]:
        """`aud` as a tuple, whichever JSON form it had."""
        return (self.aud,) if isinstance(self.aud, str) else self.aud

    def to_jwt_payload(self) -> dict[str, Any]:
        """The JSON-ready claims: `x5t#S256` spelled as on the wire, no null `scope`."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
