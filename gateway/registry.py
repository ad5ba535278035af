"""The gateway's SQLite registry: devices, enrollment secrets, certificates, keys, audit.

Owns: the schema (versioned with `PRAGMA user_version`, upgraded by `MIGRATIONS`),
the device lifecycle table `TRANSITIONS`, and a narrow storage interface in the
authority's words (`complete_enrollment`, `revoke_device`, `revoked_fingerprints`,
...). Every write runs in one `BEGIN IMMEDIATE` transaction: it all happens or
nothing is stored. Callers audit what they decide through `audit()`; only
`revoke_device` writes its own entry, in the revocation's transaction. The signing
key lifecycle is `gateway.signing_keys`' table; the registry stores its `KeyRecord`s
and enforces only that at most one key is current.

Times are float Unix epoch seconds, passed in by the caller (`now`); this module
never reads a clock. ACLs are stored as a JSON list of EMQX-style rule objects and
handed out as `tuple[shared.acl.AclRule, ...]`.

Several processes share the file: the running gateway and the admin CLI. The
database is in WAL mode (readers never block the writer), `busy_timeout` makes a
writer wait for the lock instead of failing, and `data_version()` lets the gateway
notice another process's commit cheaply: it polls it every ~200 ms and reloads
(revocations, signing keys) when the number changes.

Must not: verify secrets or CSRs, issue certificates, read clocks, or know about HTTP.
Errors: `RegistryError` for unknown devices, duplicates and illegal transitions;
`Unauthorized` when an enrollment secret is used, expired or missing at commit time.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, get_args

from cryptography import x509

from gateway.csr_policy import spki_sha256
from gateway.errors import RegistryError, Unauthorized
from gateway.signing_keys import KeyRecord
from shared.acl import AclRule, rules_from_claim, rules_to_claim
from shared.pki import cert_fingerprint
from shared.sqlite import JournalModeRefused, Synchronous, configure, connect

__all__ = [
    "BUSY_TIMEOUT_SECONDS",
    "DEVICE_ID_PATTERN",
    "MIGRATIONS",
    "TRANSITIONS",
    "AuditRecord",
    "CertRecord",
    "DeviceEvent",
    "DeviceRecord",
    "DeviceStatus",
    "Registry",
    "SecretRecord",
    "next_status",
    "validate_device_id",
]

DeviceStatus = Literal["registered", "enrolled", "revoked"]
DeviceEvent = Literal["enroll", "reenroll", "revoke"]

TRANSITIONS: Final[Mapping[tuple[DeviceStatus, DeviceEvent], DeviceStatus]] = {
    ("registered", "enroll"): "enrolled",
    ("registered", "revoke"): "revoked",
    ("enrolled", "reenroll"): "enrolled",
    ("enrolled", "revoke"): "revoked",
}
"""Device lifecycle: (status, event) -> new status. Anything absent is illegal;
`revoked` is final."""

DEVICE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
BUSY_TIMEOUT_SECONDS: Final = 5.0
MAX_AUDIT_TEXT: Final = 500
"""Longest `source` or `detail` kept in an audit entry (characters)."""


def validate_device_id(device_id: str) -> None:
    """Raise `RegistryError` unless `device_id` matches `DEVICE_ID_PATTERN`."""
    if not DEVICE_ID_PATTERN.fullmatch(device_id):
        raise RegistryError(
            f"invalid device id {device_id[:140]!r}: use 1-128 characters from "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )


def next_status(status: DeviceStatus, event: DeviceEvent) -> DeviceStatus:
    """The status after `event`, or `RegistryError` if the table does not allow it."""
    try:
        return TRANSITIONS[(status, event)]
    except KeyError:
        raise RegistryError(f"cannot {event} a device that is {status}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRecord:
    id: str
    status: DeviceStatus
    acl: tuple[AclRule, ...]
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretRecord:
    device_id: str
    secret_hash: str
    expires_at: float
    used_at: float | None
    failed_attempts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CertRecord:
    serial: str
    """Lower-case hex, no leading zeros."""
    device_id: str
    fingerprint_sha256: str
    """Lower-case hex SHA-256 of the DER certificate."""
    spki_sha256: str
    not_before: float
    not_after: float
    issued_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    id: int
    at: float
    event: str
    outcome: str
    device_id: str | None
    source: str | None
    detail: str | None


# -- schema ---------------------------------------------------------------------------

_SCHEMA_1: Final = (
    """CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('registered', 'enrolled', 'revoked')),
        acl_json TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    ) STRICT""",
    """CREATE TABLE enrollment_secrets (
        device_id TEXT PRIMARY KEY REFERENCES devices(id),
        secret_hash TEXT NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL,
        failed_attempts INTEGER NOT NULL DEFAULT 0
    ) STRICT""",
    """CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices(id),
        fingerprint_sha256 TEXT NOT NULL UNIQUE,
        spki_sha256 TEXT NOT NULL,
        not_before REAL NOT NULL,
        not_after REAL NOT NULL,
        issued_at REAL NOT NULL,
        revoked_at REAL
    ) STRICT""",
    "CREATE INDEX certificates_device ON certificates(device_id, issued_at)",
    "CREATE INDEX certificates_spki ON certificates(spki_sha256)",
    """CREATE TABLE signing_keys (
        kid TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        activated_at REAL,
        retire_after REAL,
        retired_at REAL,
        state TEXT NOT NULL CHECK (state IN ('current', 'previous', 'retired'))
    ) STRICT""",
    "CREATE UNIQUE INDEX signing_keys_one_current ON signing_keys(state) WHERE state = 'current'",
    """CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        event TEXT NOT NULL,
        device_id TEXT,
        source TEXT,
        outcome TEXT NOT NULL,
        detail TEXT
    ) STRICT""",
    "CREATE INDEX audit_device ON audit(device_id, id)",
    """CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END""",
    """CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END""",
)


def _migration_1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_1:
        conn.execute(statement)


MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (_migration_1,)
"""Migration i brings the schema from user_version i to i + 1. Append, never edit."""


# -- the registry ---------------------------------------------------------------------


class Registry:
    """One connection to the registry file; safe to share between threads.

    Open with `Registry.open(path)` (creates and migrates the file) and close with
    `close()` or a `with` block.
    """

    __slots__ = ("_commits", "_conn", "_lock", "path")

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = threading.RLock()
        self._commits = 0
        self.path = path

    @classmethod
    def open(cls, path: Path, *, synchronous: Synchronous = "FULL") -> Registry:
        """Open (creating if needed) the registry at `path` and bring its schema up to date.

        `synchronous` is per connection; FULL makes every commit survive a power cut.
        """
        conn = connect(path, timeout=BUSY_TIMEOUT_SECONDS)
        try:
            _configure(conn, synchronous)
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- change detection -------------------------------------------------------------

    def data_version(self) -> int:
        """A number that changes when another connection (e.g. the admin CLI) commits.

        SQLite's `PRAGMA data_version` ignores this connection's own commits. The
        running gateway polls it every ~200 ms and reloads revocations and signing
        keys when it differs from the last value it saw.
        """
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def generation(self) -> tuple[int, int]:
        """Changes whenever anything is committed, by another connection or by this one.

        Lets a reader cache what it derived from the registry and still see every
        change at once: one cheap PRAGMA instead of the queries it replaces.
        """
        with self._lock:
            return self.data_version(), self._commits

    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    # -- devices ----------------------------------------------------------------------

    def add_device(
        self,
        device_id: str,
        acl: Sequence[AclRule],
        secret_hash: str,
        secret_expires_at: float,
        now: float,
    ) -> None:
        """Register a device with its ACL and one-time secret; duplicate -> RegistryError."""
        validate_device_id(device_id)
        acl_json = json.dumps(rules_to_claim(acl), separators=(",", ":"))
        with self._write() as conn:
            if _device_row(conn, device_id) is not None:
                raise RegistryError(f"device {device_id!r} already exists")
            conn.execute(
                "INSERT INTO devices (id, status, acl_json, created_at, updated_at) "
                "VALUES (?, 'registered', ?, ?, ?)",
                (device_id, acl_json, now, now),
            )
            conn.execute(
                "INSERT INTO enrollment_secrets (device_id, secret_hash, expires_at) "
                "VALUES (?, ?, ?)",
                (device_id, secret_hash, secret_expires_at),
            )

    def get_device(self, device_id: str) -> DeviceRecord | None:
        with self._lock:
            row = _device_row(self._conn, device_id)
        return None if row is None else _device_record(row)

    def list_devices(self) -> list[DeviceRecord]:
        with self._lock:
            rows = self._conn.execute(f"{_DEVICE_SELECT} ORDER BY id").fetchall()
        return [_device_record(row) for row in rows]

    def revoke_device(self, device_id: str, now: float, *, source: str | None = None) -> None:
        """Revoke the device and every certificate it holds; unknown -> RegistryError."""
        with self._write() as conn:
            status = _require_status(conn, device_id)
            _set_status(conn, device_id, next_status(status, "revoke"), now)
            cursor = conn.execute(
                "UPDATE certificates SET revoked_at = ? WHERE device_id = ? AND revoked_at IS NULL",
                (now, device_id),
            )
            detail = f"{cursor.rowcount} certificate(s) revoked"
            _audit(conn, now, "device_revoke", "ok", device_id, source, detail)

    def revoked_device_ids(self) -> frozenset[str]:
        with self._lock:
            rows = self._conn.execute("SELECT id FROM devices WHERE status = 'revoked'").fetchall()
        return frozenset(row[0] for row in rows)

    def revoked_fingerprints(self) -> frozenset[str]:
        """Lower-case hex SHA-256 fingerprints of every revoked certificate."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT fingerprint_sha256 FROM certificates WHERE revoked_at IS NOT NULL"
            ).fetchall()
        return frozenset(row[0] for row in rows)

    # -- enrollment -------------------------------------------------------------------

    def enrollment_secret(self, device_id: str) -> SecretRecord | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT device_id, secret_hash, expires_at, used_at, failed_attempts "
                "FROM enrollment_secrets WHERE device_id = ?",
                (device_id,),
            ).fetchone()
        return None if row is None else SecretRecord(**dict(zip(_SECRET_FIELDS, row, strict=True)))

    def record_failed_secret(self, device_id: str, now: float) -> None:
        """Count a wrong secret presented for `device_id` (unknown ids: nothing happens).

        `now` is accepted for symmetry with the other writes; only the count is kept.
        """
        with self._write() as conn:
            conn.execute(
                "UPDATE enrollment_secrets SET failed_attempts = failed_attempts + 1 "
                "WHERE device_id = ?",
                (device_id,),
            )

    def complete_enrollment(
        self, device_id: str, cert: x509.Certificate, now: float, *, source: str | None = None
    ) -> None:
        """Use the secret, store `cert`, mark the device enrolled and audit it, all or nothing.

        The secret is consumed only if it is unused and `expires_at > now`; otherwise
        `Unauthorized` is raised, so of two concurrent enrollments only one succeeds.
        An illegal transition (e.g. a revoked device) or a certificate whose key
        another device uses raises `RegistryError`.
        """
        record = _cert_record(cert, device_id, now)
        with self._write() as conn:
            status = _require_status(conn, device_id)
            new_status = next_status(status, "enroll")
            _use_secret(conn, device_id, now)
            _insert_certificate(conn, record)
            _set_status(conn, device_id, new_status, now)
            _audit(conn, now, "enroll", "issued", device_id, source, f"serial {record.serial}")

    def add_certificate(
        self, device_id: str, cert: x509.Certificate, now: float, *, source: str | None = None
    ) -> None:
        """Store and audit a re-enrollment certificate for an enrolled device (all or nothing).

        The newest unrevoked certificate is the device's current one; the token and
        re-enrollment endpoints accept only that one (see `current_certificate`).
        """
        record = _cert_record(cert, device_id, now)
        with self._write() as conn:
            status = _require_status(conn, device_id)
            _set_status(conn, device_id, next_status(status, "reenroll"), now)
            _insert_certificate(conn, record)
            _audit(conn, now, "reenroll", "issued", device_id, source, f"serial {record.serial}")

    # -- certificates -----------------------------------------------------------------

    def certificate_by_fingerprint(self, fingerprint_hex: str) -> CertRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"{_CERT_SELECT} WHERE fingerprint_sha256 = ?", (fingerprint_hex.lower(),)
            ).fetchone()
        return None if row is None else CertRecord(**dict(zip(_CERT_FIELDS, row, strict=True)))

    def current_certificate(self, device_id: str) -> CertRecord | None:
        """The device's most recently issued certificate that is not revoked."""
        with self._lock:
            row = self._conn.execute(
                f"{_CERT_SELECT} WHERE device_id = ? AND revoked_at IS NULL "
                "ORDER BY issued_at DESC, rowid DESC LIMIT 1",
                (device_id,),
            ).fetchone()
        return None if row is None else CertRecord(**dict(zip(_CERT_FIELDS, row, strict=True)))

    def spki_in_use_by_other(self, spki_hex: str, device_id: str) -> bool:
        """Whether a device other than `device_id` holds a certificate for this key.

        A query for building `forbidden_public_keys`, not a security decision:
        `complete_enrollment` and `add_certificate` enforce the same rule themselves.
        """
        with self._lock:
            return _spki_used_by_other(self._conn, spki_hex.lower(), device_id)

    # -- signing keys -----------------------------------------------------------------

    def signing_keys(self) -> list[KeyRecord]:
        """Every signing key record, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT kid, state, created_at, retire_after, retired_at "
                "FROM signing_keys ORDER BY created_at, kid"
            ).fetchall()
        return [KeyRecord(**dict(zip(_KEY_FIELDS, row, strict=True))) for row in rows]

    def put_signing_key(self, record: KeyRecord) -> None:
        """Insert or replace one signing key record."""
        self.put_signing_keys([record])

    def put_signing_keys(self, records: Sequence[KeyRecord]) -> None:
        """Insert or replace several records in one transaction (e.g. a rotation).

        Moves are decided by `gateway.signing_keys.apply`; the registry refuses only
        a result with two current keys (`RegistryError`), storing nothing then.
        """
        ordered = sorted(records, key=lambda record: record.state == "current")
        with self._write() as conn:
            for record in ordered:
                _put_key(conn, record)

    # -- audit ------------------------------------------------------------------------

    def audit(
        self,
        event: str,
        outcome: str,
        now: float,
        device_id: str | None = None,
        source: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Append one audit entry (e.g. a refusal the caller decided)."""
        with self._write() as conn:
            _audit(conn, now, event, outcome, device_id, source, detail)

    def audit_entries(self, limit: int = 100, device_id: str | None = None) -> list[AuditRecord]:
        """The newest `limit` entries, newest first, optionally for one device."""
        with self._lock:
            if device_id is None:
                rows = self._conn.execute(_AUDIT_SELECT + " ORDER BY id DESC LIMIT ?", (limit,))
            else:
                rows = self._conn.execute(
                    _AUDIT_SELECT + " WHERE device_id = ? ORDER BY id DESC LIMIT ?",
                    (device_id, limit),
                )
            return [AuditRecord(**dict(zip(_AUDIT_FIELDS, row, strict=True))) for row in rows]

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: committed if the block returns, else rolled back."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            self._commits += 1


# -- helpers (all run inside the caller's transaction or lock) -----------------------

_DEVICE_SELECT: Final = "SELECT id, status, acl_json, created_at, updated_at FROM devices"
_SECRET_FIELDS: Final = ("device_id", "secret_hash", "expires_at", "used_at", "failed_attempts")
_CERT_FIELDS: Final = (
    "serial",
    "device_id",
    "fingerprint_sha256",
    "spki_sha256",
    "not_before",
    "not_after",
    "issued_at",
    "revoked_at",
)
_CERT_SELECT: Final = (
    "SELECT serial, device_id, fingerprint_sha256, spki_sha256, not_before, not_after, "
    "issued_at, revoked_at FROM certificates"
)
_KEY_FIELDS: Final = ("kid", "state", "created_at", "retire_after", "retired_at")
_AUDIT_FIELDS: Final = ("id", "at", "event", "outcome", "device_id", "source", "detail")
_AUDIT_SELECT: Final = "SELECT id, at, event, outcome, device_id, source, detail FROM audit"
_STATUSES: Final = frozenset(get_args(DeviceStatus))


def _configure(conn: sqlite3.Connection, synchronous: Synchronous) -> None:
    try:
        configure(
            conn,
            busy_timeout_ms=int(BUSY_TIMEOUT_SECONDS * 1000),
            synchronous=synchronous,
            foreign_keys=True,
        )
    except JournalModeRefused as exc:
        raise RegistryError(f"registry cannot use WAL mode (got {exc.mode!r})") from exc


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(MIGRATIONS):
            raise RegistryError(
                f"registry schema version {version} is newer than this gateway ({len(MIGRATIONS)})"
            )
        for index in range(version, len(MIGRATIONS)):
            MIGRATIONS[index](conn)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _device_row(conn: sqlite3.Connection, device_id: str) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = conn.execute(
        f"{_DEVICE_SELECT} WHERE id = ?", (device_id,)
    ).fetchone()
    return row


def _device_record(row: tuple[Any, ...]) -> DeviceRecord:
    device_id, status, acl_json, created_at, updated_at = row
    return DeviceRecord(
        id=device_id,
        status=_status(status),
        acl=rules_from_claim(json.loads(acl_json)),
        created_at=created_at,
        updated_at=updated_at,
    )


def _status(value: str) -> DeviceStatus:
    if value not in _STATUSES:
        raise RegistryError(f"unknown device status {value!r} in the registry")
    return value  # type: ignore[return-value]


def _require_status(conn: sqlite3.Connection, device_id: str) -> DeviceStatus:
    row = conn.execute("SELECT status FROM devices WHERE id = ?", (device_id,)).fetchone()
    if row is None:
        raise RegistryError(f"unknown device {device_id[:140]!r}")
    return _status(row[0])


def _set_status(conn: sqlite3.Connection, device_id: str, status: DeviceStatus, now: float) -> None:
    conn.execute(
        "UPDATE devices SET status = ?, updated_at = ? WHERE id = ?", (status, now, device_id)
    )


def _use_secret(conn: sqlite3.Connection, device_id: str, now: float) -> None:
    cursor = conn.execute(
        "UPDATE enrollment_secrets SET used_at = ? "
        "WHERE device_id = ? AND used_at IS NULL AND expires_at > ?",
        (now, device_id, now),
    )
    if cursor.rowcount != 1:
        raise Unauthorized(
            "invalid enrollment credentials",
            cause="enrollment secret already used, expired or missing",
        )


def _cert_record(cert: x509.Certificate, device_id: str, now: float) -> CertRecord:
    return CertRecord(
        serial=format(cert.serial_number, "x"),
        device_id=device_id,
        fingerprint_sha256=cert_fingerprint(cert).hex(),
        spki_sha256=spki_sha256(cert.public_key()).hex(),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        issued_at=now,
        revoked_at=None,
    )


def _insert_certificate(conn: sqlite3.Connection, record: CertRecord) -> None:
    if _spki_used_by_other(conn, record.spki_sha256, record.device_id):
        raise RegistryError("public key already used by another device")
    try:
        conn.execute(
            "INSERT INTO certificates (serial, device_id, fingerprint_sha256, spki_sha256, "
            "not_before, not_after, issued_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            tuple(getattr(record, name) for name in _CERT_FIELDS),
        )
    except sqlite3.IntegrityError as exc:
        raise RegistryError("certificate serial or fingerprint already stored") from exc


def _spki_used_by_other(conn: sqlite3.Connection, spki_hex: str, device_id: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM certificates WHERE spki_sha256 = ? AND device_id != ? LIMIT 1",
        (spki_hex, device_id),
    ).fetchone()
    return row is not None


def _put_key(conn: sqlite3.Connection, record: KeyRecord) -> None:
    try:
        conn.execute(
            "INSERT INTO signing_keys "
            "(kid, state, created_at, activated_at, retire_after, retired_at) "
            "VALUES (?, ?, ?, CASE WHEN ? = 'current' THEN ? END, ?, ?) "
            "ON CONFLICT (kid) DO UPDATE SET state = excluded.state, "
            "retire_after = excluded.retire_after, retired_at = excluded.retired_at",
            (
                record.kid,
                record.state,
                record.created_at,
                record.state,
                record.created_at,
                record.retire_after,
                record.retired_at,
            ),
        )
    except sqlite3.IntegrityError as exc:
        raise RegistryError(f"cannot store signing key {record.kid!r}: {exc}") from exc


def _audit(
    conn: sqlite3.Connection,
    now: float,
    event: str,
    outcome: str,
    device_id: str | None,
    source: str | None,
    detail: str | None,
) -> None:
    conn.execute(
        "INSERT INTO audit (at, event, device_id, source, outcome, detail) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (now, _clean(event), _clean(device_id), _clean(source), _clean(outcome), _clean(detail)),
    )


def _clean(text: str | None) -> str | None:
    """One printable line of bounded length: control characters are escaped."""
    if text is None:
        return None
    escaped = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return escaped[:MAX_AUDIT_TEXT]
