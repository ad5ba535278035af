"""`gatepass-gateway init`: create a state directory, never overwrite one.

Owns: the first CA, the server identity, the first signing key, the commented
`gateway.toml` and the registry, all created in a staging directory and moved into
place in one rename, so that a failed `init` leaves nothing half-written.
Must not: be called on a directory that already holds anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from gateway.authority import create_ca, create_server_certificate
from gateway.config import render_template
from gateway.errors import ConfigError
from gateway.keyring import create_first_key
from gateway.registry import Registry
from gateway.statedir import StateDir
from shared.pki import write_file_atomic, write_private_key

__all__ = ["initialize"]


def initialize(root: Path, hosts: Sequence[str] = ()) -> StateDir:
    """Create `root` with everything `serve` needs; refuse if it exists and is not empty."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"{root}: already exists and is not empty; refusing to touch it")
    parent = root.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.init-", dir=parent))
    try:
        _populate(StateDir(staging), hosts)
        if root.exists():
            root.rmdir()  # empty: checked above
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StateDir(root)


def _populate(state: StateDir, hosts: Sequence[str]) -> None:
    now = datetime.now(UTC)
    os.chmod(state.root, 0o700)
    ca_cert, ca_key = create_ca(now)
    server_cert, server_key = create_server_certificate(ca_cert, ca_key, hosts, now)
    write_file_atomic(state.ca_cert, ca_cert.public_bytes(Encoding.PEM))
    write_private_key(state.ca_key, ca_key)
    write_file_atomic(state.server_cert, server_cert.public_bytes(Encoding.PEM))
    write_private_key(state.server_key, server_key)
    state.keys.mkdir(mode=0o700)
    issuer = f"https://{hosts[0] if hosts else 'localhost'}:8443"
    bind = "0.0.0.0" if hosts else "127.0.0.1"
    write_file_atomic(state.config, render_template(issuer=issuer, bind=bind).encode())
    registry = Registry.open(state.database)
    with contextlib.closing(registry):
        create_first_key(state, registry, time.time())
