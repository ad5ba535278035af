"""The gateway's state directory: its layout, and reading the files in it.

Owns: where each file of `DIR` lives (SPEC "Gateway state directory"), and loading the
CA, the server identity and the token signing keys from disk with one clear error per
problem. Must not: create the directory (`gateway.init` does) or hold runtime state.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.errors import ConfigError
from shared.errors import PkiError
from shared.keyset import SigningKey
from shared.pki import load_certificate, load_private_key, write_file_atomic, write_private_key

__all__ = ["StateDir"]


@dataclass(frozen=True, slots=True)
class StateDir:
    """Paths of one gateway's state directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "gateway.toml"

    @property
    def database(self) -> Path:
        return self.root / "gateway.db"

    @property
    def mqtt_sessions(self) -> Path:
        """Persistent MQTT sessions (gateway.mqtt_sessions.SessionStore), a file of its own."""
        return self.root / "mqtt-sessions.db"

    @property
    def ca_cert(self) -> Path:
        return self.root / "pki" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "pki" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "pki" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "pki" / "server.key"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def endpoints(self) -> Path:
        return self.root / "run" / "endpoints.json"

    def signing_key_path(self, kid: str) -> Path:
        return self.keys / f"{kid}.pem"

    def require_initialized(self) -> None:
        if not self.config.is_file() or not self.database.is_file():
            raise ConfigError(f"{self.root}: not a gateway state directory (run 'init' first)")

    def load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        return self._load_pair(self.ca_cert, self.ca_key)

    def load_signing_key(self, kid: str) -> SigningKey:
        path = self.signing_key_path(kid)
        try:
            return SigningKey(kid=kid, private_key=load_private_key(self._read(path)))
        except PkiError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def write_signing_key(self, key: SigningKey) -> None:
        write_private_key(self.signing_key_path(key.kid), key.private_key)

    def write_endpoints(self, https_port: int, mqtt_port: int) -> None:
        body = {
            "https": f"https://127.0.0.1:{https_port}",
            "mqtt": f"mqtts://127.0.0.1:{mqtt_port}",
            "pid": os.getpid(),
        }
        write_file_atomic(self.endpoints, json.dumps(body).encode() + b"\n")

    def remove_endpoints(self) -> None:
        self.endpoints.unlink(missing_ok=True)

    def _load_pair(
        self, cert_path: Path, key_path: Path
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            return load_certificate(self._read(cert_path)), load_private_key(self._read(key_path))
        except PkiError as exc:
            raise ConfigError(f"{cert_path.parent}: {exc}") from exc

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
