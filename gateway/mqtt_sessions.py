"""Persistent MQTT sessions that outlive the gateway process: their rules and their store.

Owns: what of a clean_session=0 session is kept across a gateway restart and for how
long (`SessionRetention`, `StoredSession`, `is_durable`, `expiry_bound`, `regrant`),
and the SQLite file that keeps it (`SessionStore`, WAL, a file of its own such as
`DIR/mqtt-sessions.db`): per client id the device id, the grant (ACL rules of the
last token, so that a restored offline session receives only what it was allowed),
the idle-expiry bound, the subscriptions, and the QoS 1 messages queued for the
session while it is offline.
Must not: touch amqtt, sockets or the clock (the current time is a parameter), decide
who may connect or subscribe (`gateway.mqtt_policy`), or be used for ONLINE
delivery: a message handed to a connected subscriber is never written here.

Life of a stored session:

    event                          effect on the store
    connect, clean_session=0       saved: device, grant replaced; no expiry while online
    connect, clean_session=1       forgotten with everything it holds
    subscribe granted              subscription saved (qos replaced)
    unsubscribe; or a resume whose new token no longer allows a filter
                                   subscription forgotten
    offline match of a QoS 1 PUBLISH
                                   message appended before the publisher's PUBACK;
                                   beyond `bound`, the oldest are dropped and counted
    PUBACK of a stored message     message deleted (late deletes only risk a duplicate)
    disconnect                     expiry = now + idle; unacknowledged QoS 1 in flight
                                   appended
    idle expiry passed             forgotten (swept, and at load)

Exception tree:

    GatewayError (gateway.errors)
    +-- SessionStoreError      the file cannot be opened, read or written (cause chained)
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from pydantic import ValidationError

from gateway.errors import GatewayError
from gateway.mqtt_policy import SessionState
from shared.acl import AclRule, CompiledAcl, rules_from_claim, rules_to_claim
from shared.errors import AccessDenied
from shared.sqlite import (
    Synchronous,
    configure,
    connect,
    create_private_file,
    write_transaction,
)

__all__ = [
    "DEFAULT_IDLE_EXPIRY",
    "Enqueued",
    "QueuedMessage",
    "QueuedWrite",
    "SessionRetention",
    "SessionStore",
    "SessionStoreError",
    "StoredSession",
    "Subscription",
    "expiry_bound",
    "is_durable",
    "regrant",
    "restored_state",
]

DEFAULT_IDLE_EXPIRY: Final = 7 * 24 * 3600.0
"""An offline persistent session is forgotten after a week without a connection."""
DURABLE_QOS: Final = 1
"""Only QoS 1 messages are kept on disk (QoS 0 is never queued; no device uses QoS 2)."""
_BUSY_TIMEOUT_MS: Final = 5000
_SCHEMA_VERSION: Final = 1


class SessionStoreError(GatewayError):
    """The session store file cannot be opened, read or written."""


# -- values and rules (no I/O) ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionRetention:
    """How long an offline persistent session is kept (seconds since its disconnect)."""

    idle_expiry: float = DEFAULT_IDLE_EXPIRY

    def __post_init__(self) -> None:
        if not self.idle_expiry > 0:
            raise ValueError("idle_expiry must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscription:
    """One granted subscription: a topic filter and its granted QoS."""

    topic_filter: str
    qos: int

    def __post_init__(self) -> None:
        if not self.topic_filter or self.qos not in (0, 1, 2):
            raise ValueError(f"invalid subscription {self.topic_filter!r} qos {self.qos}")


@dataclass(frozen=True, slots=True, kw_only=True)
class QueuedMessage:
    """A QoS 1 message stored for an offline session; `row_id` orders and names it."""

    row_id: int
    topic: str
    payload: bytes
    qos: int


QueuedWrite = tuple[str, str, bytes, int]
"""(client id, topic, payload, qos) of a message to queue for an offline session."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Enqueued:
    """Result of an append: the new row, and how many old ones the bound dropped."""

    row_id: int
    dropped: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredSession:
    """A persistent session as the store gives it back at start-up."""

    client_id: str
    device_id: str
    rules: tuple[AclRule, ...]
    expires_at: float
    subscriptions: tuple[Subscription, ...] = ()
    queued: tuple[QueuedMessage, ...] = ()

    def __post_init__(self) -> None:
        if not self.client_id or not self.device_id:
            raise ValueError("a stored session needs a client id and a device id")


def is_durable(clean_session: bool, qos: int) -> bool:
    """Whether a message queued for an offline session is written to the store."""
    return not clean_session and qos == DURABLE_QOS


def expiry_bound(retention: SessionRetention, disconnected_at: float) -> float:
    """When a session that went offline at `disconnected_at` is forgotten."""
    return disconnected_at + retention.idle_expiry


def restored_state(stored: StoredSession) -> SessionState:
    """The grant a restored OFFLINE session holds until its client connects again.

    It carries the ACL of the session's last token, so that only what that token
    allowed is queued for it (`check_receive` ignores `exp`), and `exp=0`: every
    check that needs a live token (publish, subscribe) refuses it.
    """
    return SessionState(
        device_id=stored.device_id,
        client_id=stored.client_id,
        kid="",
        jti="",
        exp=0,
        acl=CompiledAcl(stored.rules),
    )


def regrant(
    subscriptions: Iterable[str], acl: CompiledAcl
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split restored filters into (kept, dropped) under a NEW token's `acl`."""
    kept: list[str] = []
    dropped: list[str] = []
    for topic_filter in subscriptions:
        try:
            acl.check_subscribe(topic_filter)
        except AccessDenied:
            dropped.append(topic_filter)
        else:
            kept.append(topic_filter)
    return tuple(kept), tuple(dropped)


# -- the SQLite adapter -------------------------------------------------------------

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS sessions (
    client_id  TEXT PRIMARY KEY,
    device_id  TEXT NOT NULL,
    acl        TEXT NOT NULL,
    expires_at REAL
);
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id    TEXT    NOT NULL REFERENCES sessions (client_id) ON DELETE CASCADE,
    topic_filter TEXT    NOT NULL,
    qos          INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    PRIMARY KEY (client_id, topic_filter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queued (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id TEXT    NOT NULL REFERENCES sessions (client_id) ON DELETE CASCADE,
    topic     TEXT    NOT NULL,
    payload   BLOB    NOT NULL,
    qos       INTEGER NOT NULL CHECK (qos IN (0, 1, 2))
);
CREATE INDEX IF NOT EXISTS queued_by_client ON queued (client_id, id);
"""

_TRIM: Final = """
DELETE FROM queued WHERE client_id = ?1 AND id <= (
    SELECT id FROM queued WHERE client_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2
)
"""


def _write_failed(exc: sqlite3.Error) -> SessionStoreError:
    return SessionStoreError(f"session store write failed: {exc}")


def _prepare(conn: sqlite3.Connection, synchronous: Synchronous) -> None:
    configure(conn, busy_timeout_ms=_BUSY_TIMEOUT_MS, synchronous=synchronous, foreign_keys=True)
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > _SCHEMA_VERSION:
        raise sqlite3.OperationalError(f"schema version {version} is newer than this gateway")
    version_pragma = f"PRAGMA user_version = {_SCHEMA_VERSION};"
    conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} {version_pragma} COMMIT;")


class SessionStore:
    """The durable half of persistent sessions: a narrow interface over one SQLite file.

    Every method is one small transaction, on disk when it returns (with
    `synchronous="FULL"`; `"NORMAL"` survives a killed process but not a power cut).
    Calls are synchronous and meant for the broker's event loop: each is a few
    indexed statements.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, retention: SessionRetention) -> None:
        """Use `SessionStore.open`; this only wires an already prepared connection."""
        self._conn = conn
        self.path = path
        self.retention = retention
        self.commits = 0
        """Write transactions committed through this store (each one a synced write)."""
        self._known: set[str] = {
            client_id for (client_id,) in conn.execute("SELECT client_id FROM sessions")
        }

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        retention: SessionRetention | None = None,
        synchronous: Synchronous = "FULL",
    ) -> Self:
        """Open (creating if needed) the store at `path`."""
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        file = Path(path)
        try:
            create_private_file(file)
            conn = connect(file)
        except (OSError, sqlite3.Error) as exc:
            raise SessionStoreError(f"cannot open session store {file}: {exc}") from exc
        try:
            _prepare(conn, synchronous)
            return cls(conn, file, retention or SessionRetention())
        except sqlite3.Error as exc:
            conn.close()
            raise SessionStoreError(f"session store {file} is unusable: {exc}") from exc

    def __contains__(self, client_id: object) -> bool:
        """Whether the store holds a session of `client_id` (answered from memory)."""
        return client_id in self._known

    def close(self) -> None:
        """Close the file; the store must not be used afterwards."""
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

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is durable, or none of it happened."""
        with write_transaction(self._conn, _write_failed) as conn:
            yield conn
        self.commits += 1

    # -- sessions ----------------------------------------------------------------------

    def load(self, now: float) -> list[StoredSession]:
        """Every session still within its expiry, with subscriptions and queued messages.

        Sessions past their expiry are deleted first. A session that was online when
        the gateway stopped (no expiry yet) counts as disconnected `now`.
        """
        with self._transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
            conn.execute(
                "UPDATE sessions SET expires_at = ? WHERE expires_at IS NULL",
                (expiry_bound(self.retention, now),),
            )
            rows = conn.execute(
                "SELECT client_id, device_id, acl, expires_at FROM sessions ORDER BY client_id"
            ).fetchall()
            subscriptions = self._subscriptions(conn)
            queued = self._queued(conn)
        self._known = {row[0] for row in rows}
        return [
            StoredSession(
                client_id=client_id,
                device_id=device_id,
                rules=self._rules(client_id, acl),
                expires_at=float(expires_at),
                subscriptions=tuple(subscriptions.get(client_id, ())),
                queued=tuple(queued.get(client_id, ())),
            )
            for client_id, device_id, acl, expires_at in rows
        ]

    def save(self, client_id: str, device_id: str, rules: Sequence[AclRule]) -> None:
        """A clean_session=0 CONNECT was accepted: keep the session (and its new grant)."""
        acl = json.dumps(rules_to_claim(rules), separators=(",", ":"))
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO sessions (client_id, device_id, acl, expires_at)"
                " VALUES (?, ?, ?, NULL) ON CONFLICT (client_id) DO UPDATE SET"
                " device_id = excluded.device_id, acl = excluded.acl, expires_at = NULL",
                (client_id, device_id, acl),
            )
        self._known.add(client_id)

    def forget(self, client_id: str) -> None:
        """Forget the session, its subscriptions and its queued messages."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE client_id = ?", (client_id,))
        self._known.discard(client_id)

    def disconnected(
        self,
        client_id: str,
        now: float,
        inflight: Sequence[tuple[str, bytes, int]] = (),
        *,
        bound: int,
    ) -> list[int]:
        """The session went offline: start its idle expiry, keep its unacknowledged
        messages (topic, payload, qos); returns their row ids in the same order."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE sessions SET expires_at = ? WHERE client_id = ?",
                (expiry_bound(self.retention, now), client_id),
            )
            rows = [self._append(conn, client_id, *message) for message in inflight]
            if rows:
                conn.execute(_TRIM, (client_id, bound))
        return rows

    def expire(self, now: float) -> list[str]:
        """Forget every offline session whose idle expiry has passed; return their ids."""
        with self._transaction() as conn:
            rows = conn.execute(
                "DELETE FROM sessions WHERE expires_at <= ? RETURNING client_id", (now,)
            ).fetchall()
        expired = sorted(client_id for (client_id,) in rows)
        self._known.difference_update(expired)
        return expired

    # -- subscriptions -----------------------------------------------------------------

    def subscribe(self, client_id: str, subscription: Subscription) -> None:
        """Keep a granted subscription (its QoS replaced if it existed)."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO subscriptions (client_id, topic_filter, qos) VALUES (?, ?, ?)"
                " ON CONFLICT (client_id, topic_filter) DO UPDATE SET qos = excluded.qos",
                (client_id, subscription.topic_filter, subscription.qos),
            )

    def unsubscribe(self, client_id: str, topic_filters: Iterable[str]) -> None:
        """Forget these subscriptions of the session (unknown ones are ignored)."""
        with self._transaction() as conn:
            conn.executemany(
                "DELETE FROM subscriptions WHERE client_id = ? AND topic_filter = ?",
                [(client_id, topic_filter) for topic_filter in topic_filters],
            )

    # -- queued messages ---------------------------------------------------------------

    def enqueue(
        self, client_id: str, topic: str, payload: bytes, qos: int, *, bound: int
    ) -> Enqueued:
        """Append a message for an offline session; beyond `bound` drop the oldest."""
        (row_id,), dropped = self._enqueue([(client_id, topic, payload, qos)], bound)
        return Enqueued(row_id=row_id, dropped=dropped)

    def enqueue_many(self, messages: Sequence[QueuedWrite], *, bound: int) -> list[int]:
        """`enqueue` for many messages in one transaction (one sync); their rows, in order.

        The broker gathers what a loop iteration queued for offline sessions and
        commits it at once: a subscriber offline under a fleet's traffic cost one
        synced commit per message.
        """
        rows, _ = self._enqueue(messages, bound)
        return rows

    def _enqueue(self, messages: Sequence[QueuedWrite], bound: int) -> tuple[list[int], int]:
        if bound < 1:
            raise ValueError("bound must be positive")
        if not messages:
            return [], 0
        with self._transaction() as conn:
            rows = [self._append(conn, *message) for message in messages]
            dropped = 0
            for client_id in dict.fromkeys(message[0] for message in messages):
                dropped += max(conn.execute(_TRIM, (client_id, bound)).rowcount, 0)
        return rows, dropped

    def delivered(self, row_ids: Iterable[int]) -> None:
        """The subscriber acknowledged these messages: delete them."""
        ids = [(row_id,) for row_id in row_ids]
        if not ids:
            return
        with self._transaction() as conn:
            conn.executemany("DELETE FROM queued WHERE id = ?", ids)

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    def _append(
        conn: sqlite3.Connection, client_id: str, topic: str, payload: bytes, qos: int
    ) -> int:
        cursor = conn.execute(
            "INSERT INTO queued (client_id, topic, payload, qos) VALUES (?, ?, ?, ?)",
            (client_id, topic, bytes(payload), qos),
        )
        row_id = cursor.lastrowid
        if row_id is None:
            raise sqlite3.OperationalError("no row id for an appended message")
        return row_id

    @staticmethod
    def _subscriptions(conn: sqlite3.Connection) -> dict[str, list[Subscription]]:
        found: dict[str, list[Subscription]] = {}
        for client_id, topic_filter, qos in conn.execute(
            "SELECT client_id, topic_filter, qos FROM subscriptions"
            " ORDER BY client_id, topic_filter"
        ):
            found.setdefault(client_id, []).append(
                Subscription(topic_filter=topic_filter, qos=int(qos))
            )
        return found

    @staticmethod
    def _queued(conn: sqlite3.Connection) -> dict[str, list[QueuedMessage]]:
        found: dict[str, list[QueuedMessage]] = {}
        for row_id, client_id, topic, payload, qos in conn.execute(
            "SELECT id, client_id, topic, payload, qos FROM queued ORDER BY id"
        ):
            found.setdefault(client_id, []).append(
                QueuedMessage(row_id=row_id, topic=topic, payload=bytes(payload), qos=int(qos))
            )
        return found

    def _rules(self, client_id: str, acl: str) -> tuple[AclRule, ...]:
        try:
            return rules_from_claim(json.loads(acl))
        except (ValueError, ValidationError) as exc:
            raise SessionStoreError(
                f"session store {self.path}: grant of {client_id!r} is corrupt"
            ) from exc
