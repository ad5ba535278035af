"""Gateway settings: the `gateway.toml` schema, its commented template, and loading.

Owns: every tunable of the gateway with its default and bounds, reading
`DIR/gateway.toml`, and letting `GATEPASS_*` environment variables override it.
Settings are frozen once loaded. Must not: touch keys, the registry or sockets.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigError

__all__ = ["MAX_TOKEN_LIFETIME", "GatewaySettings", "load_settings", "render_template"]

MAX_TOKEN_LIFETIME = 3600


class GatewaySettings(BaseSettings):
    """Every gateway setting. Environment variables `GATEPASS_<NAME>` win over the file."""

    model_config = SettingsConfigDict(
        env_prefix="GATEPASS_", frozen=True, extra="forbid", validate_default=True
    )

    issuer: str = Field(default="https://localhost:8443", min_length=1)
    audience: str = Field(default="gatepass-mqtt", min_length=1)
    bind: str = "127.0.0.1"
    https_port: int = Field(default=8443, ge=0, le=65535)
    mqtt_port: int = Field(default=8883, ge=0, le=65535)
    token_lifetime: int = Field(default=300, ge=5, le=MAX_TOKEN_LIFETIME)
    token_rate_per_minute: float = Field(default=10.0, gt=0)
    token_burst: int = Field(default=5, ge=1)
    failure_rate_per_minute: float = Field(default=30.0, gt=0)
    failure_burst: int = Field(default=10, ge=1)
    cert_validity_days: float = Field(default=30.0, gt=0, le=825)
    enrollment_secret_ttl: int = Field(default=86400, ge=60)
    key_rotation_days: float = Field(default=0.0, ge=0)
    require_client_cert: bool = True
    deny_action: Literal["ignore", "disconnect"] = "disconnect"
    max_packet_size: int = Field(default=262144, ge=1024, le=268435455)
    max_connections: int = Field(default=20000, ge=1)
    mqtt_offline_queue: int = Field(default=1000, ge=1, le=10_000_000)
    mqtt_slow_subscriber_timeout: float = Field(default=10.0, ge=0.1, le=3600.0)
    max_request_body: int = Field(default=16384, ge=1024)
    http_idle_timeout: float = Field(default=30.0, ge=1.0, le=600.0)
    tls_handshake_timeout: float = Field(default=10.0, ge=1.0, le=120.0)
    registry_poll_ms: int = Field(default=200, ge=20, le=5000)
    gc_full_interval: float = Field(default=300.0, ge=0.0, le=86400.0)

    @field_validator("issuer")
    @classmethod
    def _issuer_is_https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("issuer must be an https:// URL (RFC 8414)")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init kwargs; the environment must override them.
        return (env_settings, init_settings)

    # --- RabbitMQ profile ---
    # See gateway/rabbitmq.py and docs/scaling-out.md. With `rabbitmq` on, tokens also
    # carry RabbitMQ `scope` and `aud` lists `rabbitmq_resource_server_id`.
    rabbitmq: bool = False
    rabbitmq_resource_server_id: str = Field(
        default="gatepass", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"
    )
    rabbitmq_vhost: str = Field(default="/", min_length=1)
    rabbitmq_mqtt_port: int = Field(default=1883, ge=1, le=65535)
    rabbitmq_management_url: str = Field(
        default="http://127.0.0.1:15672", pattern=r"^https?://[^/?#]+$"
    )
    rabbitmq_management_user: str = Field(default="gatepass-enforcer", min_length=1)
    rabbitmq_management_password: SecretStr = SecretStr("")
    rabbitmq_enforce_interval_ms: int = Field(default=500, ge=100, le=5000)


def load_settings(path: Path) -> GatewaySettings:
    """Read `gateway.toml`; any problem is a one-line `ConfigError`."""
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file (run 'gatepass-gateway init' first)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return GatewaySettings(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"{path}: {where}: {first['msg']}") from exc


def render_template(*, issuer: str, bind: str) -> str:
    """The commented `gateway.toml` written by `init`."""
    return f"""\
# Gatepass gateway settings. Every key may be overridden by an environment variable
# GATEPASS_<KEY> (for example GATEPASS_TOKEN_LIFETIME=120).

# Issuer identifier put in every token's "iss" and in the RFC 8414 metadata.
issuer = "{issuer}"
# Audience put in every token's "aud"; the MQTT listener accepts only this audience.
audience = "gatepass-mqtt"

# Address both listeners bind to (0.0.0.0 serves a LAN; 127.0.0.1 only this machine).
bind = "{bind}"
# HTTPS API (EST enrollment, OAuth token endpoint, JWKS, metrics). 0 picks a free port.
https_port = 8443
# MQTT over TLS. 0 picks a free port.
mqtt_port = 8883

# Access-token lifetime in seconds (at most {MAX_TOKEN_LIFETIME}; never beyond the certificate).
token_lifetime = 300
# Tokens a device may obtain per minute, and the burst above that rate (429 beyond).
token_rate_per_minute = 10.0
token_burst = 5
# Failed authentications allowed per source address (and per device) per minute.
failure_rate_per_minute = 30.0
failure_burst = 10

# Validity of device certificates in days (backdated 5 minutes for clock skew).
cert_validity_days = 30.0
# Lifetime of a one-time enrollment secret in seconds.
enrollment_secret_ttl = 86400
# Rotate the token signing key automatically every N days (0 = only by hand).
key_rotation_days = 0.0

# MQTT: require a client certificate on the TLS handshake.
require_client_cert = true
# MQTT: what a refused PUBLISH does to its session: "disconnect" or "ignore".
deny_action = "disconnect"
# MQTT: largest packet accepted, in bytes.
max_packet_size = 262144
# MQTT: most simultaneous connections. At start the gateway raises its soft open-file
# limit to this plus 1024; the hard limit must allow it (systemd LimitNOFILE=).
max_connections = 20000
# MQTT: QoS 1 messages kept for a persistent session while its client is offline
# (reconnecting for a new token, say); beyond that the oldest are dropped and counted.
# A subscriber that takes a whole fleet's traffic needs rate x longest outage.
mqtt_offline_queue = 1000
# MQTT: a subscriber that takes nothing for this many seconds while messages wait for
# it is disconnected (its QoS 1 messages stay with its session); until then its
# publishers' PUBACKs wait for it (back-pressure, never a dropped message).
mqtt_slow_subscriber_timeout = 10.0

# HTTPS: largest request body accepted, in bytes (CSRs, token requests).
max_request_body = 16384
# HTTPS: a connection that sends no complete request for this many seconds is closed
# (idle keep-alive, slow or unfinished headers).
http_idle_timeout = 30.0
# Both listeners: a connection whose TLS handshake has not finished after this many
# seconds is dropped (a client that connects and sends nothing holds a descriptor).
tls_handshake_timeout = 10.0
# How often (milliseconds) the running gateway looks for registry changes made by the CLI.
registry_poll_ms = 200
# Seconds between full garbage collections of the gateway process (sooner if it grew by
# half). Python's own schedule stopped the broker for up to 0.9 s every few seconds at
# 5,000 connections; 0 leaves Python's schedule in place.
gc_full_interval = 300.0

# --- RabbitMQ profile (docs/scaling-out.md) ---
# Issue tokens that a RabbitMQ 3.10+ cluster also accepts: they carry "scope" (the ACL
# in RabbitMQ's form) and "aud" lists the resource server id as well. 'device add'
# then refuses ACLs that RabbitMQ cannot enforce exactly.
rabbitmq = false
# RabbitMQ's auth_oauth2.resource_server_id (the scope prefix and the extra audience).
rabbitmq_resource_server_id = "gatepass"
# Virtual host and MQTT port of the RabbitMQ nodes (for 'gatepass-gateway rabbitmq config').
rabbitmq_vhost = "/"
rabbitmq_mqtt_port = 1883
# Management API used by 'gatepass-gateway rabbitmq enforce' to close sessions.
rabbitmq_management_url = "http://127.0.0.1:15672"
rabbitmq_management_user = "gatepass-enforcer"
# Better set GATEPASS_RABBITMQ_MANAGEMENT_PASSWORD in the environment than here.
rabbitmq_management_password = ""
# How often (milliseconds) the enforcer polls RabbitMQ.
rabbitmq_enforce_interval_ms = 500
"""
