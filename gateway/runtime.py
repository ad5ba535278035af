"""The running gateway: one object that owns its state and keeps it current.

Owns: opening the state directory (settings, registry, CA, signing keys), the
services built on them (enrollment, tokens), the in-memory views the MQTT listener
trusts (verification keys, revoked devices), and the watcher that notices registry
changes made by the admin CLI in another process within `registry_poll_ms`.
Must not: open sockets (see `gateway.server`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config import GatewaySettings, load_settings
from gateway.enrollment import EnrollmentService
from gateway.keyring import KeyRing, expire_keys, rotate_keys
from gateway.metrics import GatewayMetrics
from gateway.registry import Registry
from gateway.signing_keys import due_for_rotation
from gateway.statedir import StateDir
from gateway.token_service import TokenService
from shared.tokens import TokenVerifier

__all__ = ["Gateway", "Snapshot"]

log = logging.getLogger("gatepass.gateway")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the listeners trust at one instant; replaced whole, never mutated."""

    keyring: KeyRing
    revoked_devices: frozenset[str]
    retired_kids: frozenset[str] = field(default_factory=frozenset)


Listener = Callable[[Snapshot, Snapshot], None]


class Gateway:
    def __init__(
        self,
        state: StateDir,
        settings: GatewaySettings,
        registry: Registry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.settings = settings
        self.registry = registry
        self.clock = clock
        self.metrics = GatewayMetrics()
        ca_cert, ca_key = state.load_ca()
        self.ca_cert = ca_cert
        self.enrollment = EnrollmentService(
            settings, registry, ca_cert, ca_key, self.metrics, clock
        )
        self.tokens = TokenService(
            settings, registry, lambda: self.snapshot.keyring, self.metrics, clock
        )
        self.snapshot = self._read_snapshot()
        self.verifier = TokenVerifier(
            self.snapshot.keyring.verifying, issuer=settings.issuer, audience=settings.audience
        )
        self._listeners: list[Listener] = []
        self.mqtt_port: int | None = None  # set by `serve` once the MQTT listener is bound
        self._data_version = registry.data_version()

    @classmethod
    def open(cls, root: Any, clock: Callable[[], float] = time.time) -> Gateway:
        state = StateDir(root)
        state.require_initialized()
        settings = load_settings(state.config)
        # FULL: an enrollment (a spent secret, an issued certificate) must survive a power
        # cut. NORMAL would save about 1.4 ms of CPU per enrollment here, but a power cut
        # could then undo a spent secret and forget a certificate already handed out.
        return cls(state, settings, Registry.open(state.database, synchronous="FULL"), clock)

    def close(self) -> None:
        self.registry.close()

    def on_change(self, listener: Listener) -> None:
        """Call `listener(old, new)` whenever the trusted snapshot changes."""
        self._listeners.append(listener)

    def jwks(self) -> dict[str, Any]:
        return self.snapshot.keyring.verifying.to_jwks()

    def metadata(self, base_url: str, host: str) -> dict[str, Any]:
        """RFC 8414 authorization server metadata, plus where the MQTT listener is."""
        extra = {}
        if self.mqtt_port is not None:
            literal = f"[{host}]" if ":" in host else host
            extra["mqtt_uri"] = f"mqtts://{literal}:{self.mqtt_port}"
        return extra | {
            "issuer": self.settings.issuer,
            "token_endpoint": f"{base_url}/oauth2/token",
            "jwks_uri": f"{base_url}/.well-known/jwks.json",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["tls_client_auth"],
            "tls_client_certificate_bound_access_tokens": True,
            "token_endpoint_auth_signing_alg_values_supported": ["ES256"],
            "response_types_supported": [],
            "est_base": f"{base_url}/.well-known/est",
        }

    def refresh(self) -> bool:
        """Re-read the registry if it changed (or keys are due to move); True if it did."""
        now = self.clock()
        version = self.registry.data_version()
        records = self.snapshot.keyring.records
        period = self.settings.key_rotation_days * 86400
        if due_for_rotation(records, now, period):
            rotate_keys(self.state, self.registry, now, self.settings.token_lifetime)
        elif not self._keys_due(now) and version == self._data_version:
            return False
        expire_keys(self.registry, now)
        self._data_version = self.registry.data_version()
        old, new = self.snapshot, self._read_snapshot()
        if new == old:
            return False
        self.snapshot = new
        if new.keyring.verifying.kids != old.keyring.verifying.kids:
            self.verifier.replace_keys(new.keyring.verifying)
        for listener in self._listeners:
            listener(old, new)
        return True

    async def watch(self) -> None:
        """Poll the registry until cancelled; errors are logged, never fatal."""
        interval = self.settings.registry_poll_ms / 1000.0
        while True:
            await asyncio.sleep(interval)
            try:
                self.refresh()
            except Exception:  # the watcher must outlive a transient SQLite error
                log.exception("registry refresh failed")

    def _keys_due(self, now: float) -> bool:
        expiry = self.snapshot.keyring.next_expiry()
        return expiry is not None and now >= expiry

    def _read_snapshot(self) -> Snapshot:
        now = self.clock()
        ring = KeyRing.load(self.state, self.registry, now)
        return Snapshot(
            keyring=ring,
            revoked_devices=self.registry.revoked_device_ids(),
            retired_kids=ring.retired_kids(now),
        )
