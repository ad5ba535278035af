"""gateway.registry on real SQLite files: schema, lifecycle, single use, revocation, audit."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from gateway.authority import create_ca, issue_device_certificate
from gateway.csr_policy import spki_sha256
from gateway.errors import RegistryError, Unauthorized
from gateway.registry import (
    MIGRATIONS,
    TRANSITIONS,
    DeviceEvent,
    DeviceStatus,
    Registry,
    next_status,
    validate_device_id,
)
from gateway.signing_keys import KeyRecord
from shared.acl import AclRule, default_rules, rules_from_cli
from shared.pki import build_csr, cert_fingerprint, generate_p256_key

T0 = 1_750_000_000.0
DAY = 86_400.0
CA_CERT, CA_KEY = create_ca(datetime.fromtimestamp(T0, UTC))


def device_cert(
    device_id: str, key: ec.EllipticCurvePrivateKey | None = None, at: float = T0
) -> x509.Certificate:
    csr = build_csr(key or generate_p256_key(), device_id)
    return issue_device_certificate(
        csr, device_id, CA_CERT, CA_KEY, datetime.fromtimestamp(at, UTC)
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
def registry(path: Path) -> Iterator[Registry]:
    with Registry.open(path) as reg:
        yield reg


def add(registry: Registry, device_id: str = "dev-1", expires_at: float = T0 + DAY) -> None:
    registry.add_device(device_id, default_rules(), "scrypt$hash", expires_at, T0)


def count(path: Path, table: str) -> int:
    with closing(sqlite3.connect(path)) as conn, conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608


# -- schema ---------------------------------------------------------------------------


def test_schema_version_wal_and_foreign_keys(path: Path, registry: Registry) -> None:
    assert registry.schema_version() == len(MIGRATIONS) >= 1
    with closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.IntegrityError):
        registry._conn.execute(  # the pragma is on: orphans are impossible
            "INSERT INTO certificates VALUES ('1', 'ghost', 'f', 's', 0, 0, 0, NULL)"
        )


def test_migrations_are_idempotent(path: Path) -> None:
    with Registry.open(path) as first:
        add(first)
    with Registry.open(path) as again, Registry.open(path) as concurrent:
        assert again.schema_version() == concurrent.schema_version() == len(MIGRATIONS)
        assert [d.id for d in again.list_devices()] == ["dev-1"]


def test_newer_schema_is_refused(path: Path) -> None:
    Registry.open(path).close()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RegistryError, match="newer"):
        Registry.open(path)


# -- device ids and the lifecycle table -----------------------------------------------


@pytest.mark.parametrize("device_id", ["a", "dev-1", "Sensor_07.kitchen", "9" * 128])
def test_valid_device_ids(device_id: str) -> None:
    validate_device_id(device_id)


@pytest.mark.parametrize(
    "device_id", ["", "-dev", ".dev", "_dev", "dev/1", "dev 1", "dev+", "dév", "a" * 129, "d\n"]
)
def test_invalid_device_ids(device_id: str) -> None:
    with pytest.raises(RegistryError, match="invalid device id"):
        validate_device_id(device_id)


@given(st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z"))
def test_device_id_pattern_property(device_id: str) -> None:
    validate_device_id(device_id)


STATUSES: tuple[DeviceStatus, ...] = ("registered", "enrolled", "revoked")
EVENTS: tuple[DeviceEvent, ...] = ("enroll", "reenroll", "revoke")


@pytest.mark.parametrize("status", STATUSES)
@pytest.mark.parametrize("event", EVENTS)
def test_transition_table(status: DeviceStatus, event: DeviceEvent) -> None:
    if (status, event) in TRANSITIONS:
        assert next_status(status, event) == TRANSITIONS[(status, event)]
    else:
        with pytest.raises(RegistryError, match=f"cannot {event}"):
            next_status(status, event)


def test_revoked_is_final() -> None:
    assert not [key for key in TRANSITIONS if key[0] == "revoked"]


# -- devices --------------------------------------------------------------------------


def test_add_and_read_devices(registry: Registry) -> None:
    rules = rules_from_cli(["devices/+/commands/#"], ["devices/+/telemetry"], ["$SYS/#"])
    registry.add_device("backend", rules, "h1", T0 + DAY, T0)
    add(registry, "dev-1")
    device = registry.get_device("backend")
    assert device is not None
    assert device.status == "registered"
    assert device.acl == rules
    assert all(isinstance(rule, AclRule) for rule in device.acl)
    assert device.created_at == T0
    assert [d.id for d in registry.list_devices()] == ["backend", "dev-1"]
    assert registry.get_device("nobody") is None
    secret = registry.enrollment_secret("backend")
    assert secret is not None
    assert (secret.secret_hash, secret.expires_at, secret.used_at) == ("h1", T0 + DAY, None)
    assert secret.failed_attempts == 0


def test_duplicate_and_invalid_ids_are_refused(path: Path, registry: Registry) -> None:
    add(registry)
    with pytest.raises(RegistryError, match="already exists"):
        add(registry)
    with pytest.raises(RegistryError, match="invalid device id"):
        add(registry, "bad/id")
    assert count(path, "devices") == 1


def test_failed_secret_attempts_are_counted(registry: Registry) -> None:
    add(registry)
    registry.record_failed_secret("dev-1", T0)
    registry.record_failed_secret("dev-1", T0)
    registry.record_failed_secret("unknown", T0)
    secret = registry.enrollment_secret("dev-1")
    assert secret is not None and secret.failed_attempts == 2


# -- enrollment -----------------------------------------------------------------------


def test_complete_enrollment(registry: Registry) -> None:
    add(registry)
    cert = device_cert("dev-1")
    registry.complete_enrollment("dev-1", cert, T0 + 10)
    device = registry.get_device("dev-1")
    assert device is not None and device.status == "enrolled"
    secret = registry.enrollment_secret("dev-1")
    assert secret is not None and secret.used_at == T0 + 10
    record = registry.current_certificate("dev-1")
    assert record is not None
    assert record.serial == format(cert.serial_number, "x")
    assert record.fingerprint_sha256 == cert_fingerprint(cert).hex()
    assert record.spki_sha256 == spki_sha256(cert.public_key()).hex()
    assert record.not_after == cert.not_valid_after_utc.timestamp()
    assert record.issued_at == T0 + 10 and record.revoked_at is None
    assert registry.certificate_by_fingerprint(record.fingerprint_sha256.upper()) == record


def test_secret_is_single_use_across_connections(path: Path) -> None:
    with Registry.open(path) as gateway, Registry.open(path) as other:
        add(gateway)
        gateway.complete_enrollment("dev-1", device_cert("dev-1"), T0)
        second = device_cert("dev-1")
        with pytest.raises((Unauthorized, RegistryError)):
            other.complete_enrollment("dev-1", second, T0)
    assert count(path, "certificates") == 1


def test_concurrent_enrollments_only_one_wins(path: Path) -> None:
    Registry.open(path).close()
    with Registry.open(path) as setup:
        add(setup)
    certs = [device_cert("dev-1") for _ in range(4)]
    barrier = threading.Barrier(len(certs))
    outcomes: list[str] = []

    def enroll(cert: x509.Certificate) -> None:
        with Registry.open(path) as reg:
            barrier.wait()
            try:
                reg.complete_enrollment("dev-1", cert, T0)
            except (Unauthorized, RegistryError) as exc:
                outcomes.append(type(exc).__name__)
            else:
                outcomes.append("ok")

    threads = [threading.Thread(target=enroll, args=(cert,)) for cert in certs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes).count("ok") == 1, outcomes
    assert count(path, "certificates") == 1


def test_expired_secret_stores_nothing(path: Path, registry: Registry) -> None:
    add(registry, expires_at=T0 + 60)
    with pytest.raises(Unauthorized) as info:
        registry.complete_enrollment("dev-1", device_cert("dev-1"), T0 + 60)
    assert "expired" in info.value.cause
    device = registry.get_device("dev-1")
    secret = registry.enrollment_secret("dev-1")
    assert device is not None and device.status == "registered"
    assert secret is not None and secret.used_at is None
    assert count(path, "certificates") == 0


def test_unknown_device_cannot_enroll(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="unknown device"):
        registry.complete_enrollment("ghost", device_cert("ghost"), T0)


def test_revoked_device_cannot_enroll_and_keeps_its_secret(path: Path, registry: Registry) -> None:
    add(registry)
    registry.revoke_device("dev-1", T0)
    with pytest.raises(RegistryError, match="cannot enroll a device that is revoked"):
        registry.complete_enrollment("dev-1", device_cert("dev-1"), T0)
    secret = registry.enrollment_secret("dev-1")
    assert secret is not None and secret.used_at is None
    assert count(path, "certificates") == 0


def test_key_of_another_device_is_refused_atomically(path: Path, registry: Registry) -> None:
    add(registry, "dev-1")
    add(registry, "dev-2")
    key = generate_p256_key()
    registry.complete_enrollment("dev-1", device_cert("dev-1", key), T0)
    spki = spki_sha256(key.public_key()).hex()
    assert registry.spki_in_use_by_other(spki, "dev-2")
    assert not registry.spki_in_use_by_other(spki, "dev-1")
    with pytest.raises(RegistryError, match="another device"):
        registry.complete_enrollment("dev-2", device_cert("dev-2", key), T0)
    secret = registry.enrollment_secret("dev-2")
    assert secret is not None and secret.used_at is None
    assert count(path, "certificates") == 1


def test_reenrollment_adds_a_current_certificate(registry: Registry) -> None:
    add(registry)
    first = device_cert("dev-1")
    with pytest.raises(RegistryError, match="cannot reenroll a device that is registered"):
        registry.add_certificate("dev-1", first, T0)
    registry.complete_enrollment("dev-1", first, T0)
    second = device_cert("dev-1", at=T0 + DAY)
    registry.add_certificate("dev-1", second, T0 + DAY)
    current = registry.current_certificate("dev-1")
    assert current is not None
    assert current.fingerprint_sha256 == cert_fingerprint(second).hex()
    with pytest.raises(RegistryError, match="already stored"):
        registry.add_certificate("dev-1", second, T0 + DAY)


# -- revocation -----------------------------------------------------------------------


def test_revocation_sets(registry: Registry) -> None:
    for device_id in ("dev-1", "dev-2", "dev-3"):
        add(registry, device_id)
    certs = {d: device_cert(d) for d in ("dev-1", "dev-2")}
    for device_id, cert in certs.items():
        registry.complete_enrollment(device_id, cert, T0)
    renewed = device_cert("dev-1")
    registry.add_certificate("dev-1", renewed, T0 + 1)
    assert registry.revoked_device_ids() == frozenset()
    assert registry.revoked_fingerprints() == frozenset()

    registry.revoke_device("dev-1", T0 + 5, source="cli")
    registry.revoke_device("dev-3", T0 + 6)

    assert registry.revoked_device_ids() == {"dev-1", "dev-3"}
    assert registry.revoked_fingerprints() == {
        cert_fingerprint(certs["dev-1"]).hex(),
        cert_fingerprint(renewed).hex(),
    }
    record = registry.certificate_by_fingerprint(cert_fingerprint(renewed).hex())
    assert record is not None and record.revoked_at == T0 + 5
    assert registry.current_certificate("dev-1") is None
    assert registry.current_certificate("dev-2") is not None
    entry = registry.audit_entries(limit=1, device_id="dev-1")[0]
    assert (entry.event, entry.outcome, entry.source) == ("device_revoke", "ok", "cli")
    assert entry.detail == "2 certificate(s) revoked"

    with pytest.raises(RegistryError, match="cannot revoke a device that is revoked"):
        registry.revoke_device("dev-1", T0 + 7)
    with pytest.raises(RegistryError, match="unknown device"):
        registry.revoke_device("ghost", T0 + 7)
    with pytest.raises(RegistryError, match="cannot reenroll"):
        registry.add_certificate("dev-1", device_cert("dev-1"), T0 + 8)


# -- change detection -----------------------------------------------------------------


def test_data_version_changes_when_another_connection_commits(path: Path) -> None:
    with Registry.open(path) as gateway, Registry.open(path) as cli:
        before = gateway.data_version()
        assert gateway.data_version() == before
        add(cli)
        after_add = gateway.data_version()
        assert after_add != before
        cli.revoke_device("dev-1", T0)
        assert gateway.data_version() != after_add
        assert gateway.revoked_device_ids() == {"dev-1"}


def test_data_version_ignores_own_commits(registry: Registry) -> None:
    before = registry.data_version()
    add(registry)
    assert registry.data_version() == before


# -- signing keys ---------------------------------------------------------------------


def test_signing_keys_round_trip_and_rotation(registry: Registry) -> None:
    first = KeyRecord(kid="k1", state="current", created_at=T0)
    registry.put_signing_key(first)
    assert registry.signing_keys() == [first]
    rotated = KeyRecord(kid="k1", state="previous", created_at=T0, retire_after=T0 + 400)
    second = KeyRecord(kid="k2", state="current", created_at=T0 + 1)
    registry.put_signing_keys([second, rotated])  # order does not matter
    assert registry.signing_keys() == [rotated, second]


def test_two_current_keys_are_refused_and_nothing_stored(registry: Registry) -> None:
    registry.put_signing_key(KeyRecord(kid="k1", state="current", created_at=T0))
    with pytest.raises(RegistryError):
        registry.put_signing_keys(
            [
                KeyRecord(kid="k0", state="retired", created_at=T0, retired_at=T0),
                KeyRecord(kid="k2", state="current", created_at=T0 + 1),
            ]
        )
    assert [record.kid for record in registry.signing_keys()] == ["k1"]


# -- audit ----------------------------------------------------------------------------


def test_audit_is_append_only(path: Path, registry: Registry) -> None:
    registry.audit("enroll", "refused", T0, device_id="dev-1", source="10.0.0.1", detail="why")
    registry.audit("enroll", "issued", T0 + 1, device_id="dev-1", source="10.0.0.1")
    registry.audit("key_rotate", "ok", T0 + 2)
    entries = registry.audit_entries(limit=10)
    assert [e.outcome for e in entries] == ["ok", "issued", "refused"]
    assert entries[2].detail == "why" and entries[2].at == T0
    assert [e.outcome for e in registry.audit_entries(limit=1, device_id="dev-1")] == ["issued"]
    with closing(sqlite3.connect(path)) as conn, conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE audit SET outcome = 'ok'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit")
    assert count(path, "audit") == 3


def test_audit_text_is_one_bounded_line(registry: Registry) -> None:
    registry.audit("enroll", "refused", T0, device_id="evil\nid", detail="x\x1b[31m" + "y" * 900)
    (entry,) = registry.audit_entries(limit=1)
    assert entry.device_id == "evil\\nid"
    assert entry.detail is not None
    assert entry.detail.startswith("x\\x1b[31m") and len(entry.detail) == 500
