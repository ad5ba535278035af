"""The agent's on-disk outbox: store-and-forward for MQTT messages, on SQLite.

Owns one SQLite file per device: the messages not yet acknowledged by the broker, in
insertion order, the telemetry sequence counter and the count of messages dropped because
the outbox was full. It must not know about MQTT connections, asyncio or the clock: the
publisher decides when to send and calls `ack` on PUBACK.

Durability. The database runs in WAL mode with ``synchronous=FULL`` by default: every
`put` fsyncs the WAL before it returns, so a message (and the sequence number it carries)
survives a power cut the moment `put` returns. With ``NORMAL`` a commit survives a
process crash (SIGKILL) but not a power cut, which on a Raspberry Pi with flaky power
could roll back the sequence counter after its readings were already published and reuse
those numbers. ``NORMAL`` stays available for fleets of simulated devices, where there
is no power to lose and an fsync per message per device is the bottleneck.

Bounds. At most ``max_messages`` messages and ``max_bytes`` bytes (topic + payload) are
kept; when a new message does not fit, the oldest are deleted and the persistent
`dropped` counter grows by their number, in the same transaction.

One process writes a given outbox at a time (the agent's `run`); other processes may
open it to read `depth` and `dropped` (``status``).

Errors::

    GatepassError
    +-- OutboxError               the outbox file cannot be used
        +-- MessageTooLarge       a single message exceeds ``max_bytes`` (also ValueError)
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from shared.errors import GatepassError
from shared.sqlite import (
    Synchronous,
    configure,
    connect,
    create_private_file,
    write_transaction,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_MESSAGES",
    "MessageTooLarge",
    "Outbox",
    "OutboxError",
    "OutboxMessage",
    "Synchronous",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    size    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value) VALUES ('seq', 0), ('dropped', 0);
"""
_BUSY_TIMEOUT_MS = 5000
DEFAULT_MAX_MESSAGES = 100_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class OutboxError(GatepassError):
    """The outbox database cannot be opened, read or written."""


class MessageTooLarge(OutboxError, ValueError):
    """One message is larger than the whole outbox may be."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxMessage:
    """A stored message; `msg_id` grows with insertion order and is never reused."""

    msg_id: int
    topic: str
    payload: bytes
    qos: int


def _message_size(topic: str, payload: bytes) -> int:
    return len(topic.encode("utf-8")) + len(payload)


def _validate_message(topic: str, qos: int) -> None:
    if not topic:
        raise ValueError("topic must not be empty")
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, not {qos!r}")


def _write_failed(exc: sqlite3.Error) -> OutboxError:
    return OutboxError(f"outbox write failed: {exc}")


class Outbox:
    """A bounded, durable FIFO of MQTT messages plus the telemetry sequence counter."""

    def __init__(self, conn: sqlite3.Connection, *, max_messages: int, max_bytes: int) -> None:
        """Use `Outbox.open`; this only wires an already prepared connection."""
        self._conn = conn
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        count, total = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages"
        ).fetchone()
        self._depth: int = count
        self._bytes: int = total

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        synchronous: Synchronous = "FULL",
    ) -> Self:
        """Open (creating if needed) the outbox at `path`."""
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("max_messages and max_bytes must be positive")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        file = Path(path)
        try:
            create_private_file(file)
            conn = connect(file)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open outbox {file}: {exc}") from exc
        try:
            cls._prepare(conn, synchronous)
            return cls(conn, max_messages=max_messages, max_bytes=max_bytes)
        except sqlite3.Error as exc:
            conn.close()
            raise OutboxError(f"outbox {file} is unusable: {exc}") from exc

    @classmethod
    def in_memory(
        cls, max_messages: int = DEFAULT_MAX_MESSAGES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> Self:
        """An outbox that does not survive the process: for virtual devices only.

        Same rules as on disk, but no file descriptors and no fsync, so that one
        simulator process can hold thousands of devices.
        """
        conn = connect(":memory:")
        conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        return cls(conn, max_messages=max_messages, max_bytes=max_bytes)

    @staticmethod
    def _prepare(conn: sqlite3.Connection, synchronous: Synchronous) -> None:
        configure(conn, busy_timeout_ms=_BUSY_TIMEOUT_MS, synchronous=synchronous)
        conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the database; the outbox must not be used afterwards."""
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

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction: all of it is durable, or none of it happened."""
        return write_transaction(self._conn, _write_failed)

    # -- writing ---------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Store a message; return its id. It is on disk when this returns."""
        _validate_message(topic, qos)
        size = self._check_size(topic, payload)
        with self._transaction() as conn:
            msg_id, dropped = self._insert(conn, topic, bytes(payload), qos, size)
        self._after_insert(size, dropped)
        return msg_id

    def put_telemetry(
        self, topic: str, build_payload: Callable[[int], bytes], qos: int = 1
    ) -> tuple[int, int]:
        """Allocate the next sequence number and store the message built for it.

        Both happen in one transaction, so a crash neither skips nor reuses a number:
        either the message with `seq` is stored and the counter says `seq`, or neither.
        If `build_payload` raises, nothing changes. Returns ``(seq, msg_id)``.
        """
        _validate_message(topic, qos)
        with self._transaction() as conn:
            seq = self._counter(conn, "seq") + 1
            payload = bytes(build_payload(seq))
            size = self._check_size(topic, payload)
            conn.execute("UPDATE counters SET value = ? WHERE name = 'seq'", (seq,))
            msg_id, dropped = self._insert(conn, topic, payload, qos, size)
        self._after_insert(size, dropped)
        return seq, msg_id

    def ack(self, msg_id: int) -> None:
        """Forget a message the broker acknowledged (unknown ids are ignored)."""
        self.ack_many((msg_id,))

    def ack_many(self, msg_ids: Iterable[int]) -> None:
        """Forget several acknowledged messages in one transaction."""
        ids = [(i,) for i in msg_ids]
        if not ids:
            return
        removed = freed = 0
        with self._transaction() as conn:
            for row in ids:
                cur = conn.execute("DELETE FROM messages WHERE id = ? RETURNING size", row)
                for (size,) in cur.fetchall():
                    removed += 1
                    freed += size
        self._depth -= removed
        self._bytes -= freed

    def _check_size(self, topic: str, payload: bytes) -> int:
        size = _message_size(topic, payload)
        if size > self._max_bytes:
            raise MessageTooLarge(
                f"message of {size} bytes exceeds the outbox bound of {self._max_bytes}"
            )
        return size

    def _insert(
        self, conn: sqlite3.Connection, topic: str, payload: bytes, qos: int, size: int
    ) -> tuple[int, tuple[int, int]]:
        """Insert one row after dropping the oldest that keep it from fitting.

        Returns the new id and ``(dropped count, dropped bytes)``.
        """
        dropped = self._drop_oldest(conn, size)
        cur = conn.execute(
            "INSERT INTO messages (topic, payload, qos, size) VALUES (?, ?, ?, ?)",
            (topic, payload, qos, size),
        )
        msg_id = cur.lastrowid
        assert msg_id is not None
        return msg_id, dropped

    def _drop_oldest(self, conn: sqlite3.Connection, incoming: int) -> tuple[int, int]:
        excess_count = self._depth + 1 - self._max_messages
        excess_bytes = self._bytes + incoming - self._max_bytes
        if excess_count <= 0 and excess_bytes <= 0:
            return 0, 0
        count = freed = 0
        last_id = 0
        for msg_id, size in conn.execute("SELECT id, size FROM messages ORDER BY id"):
            if count >= excess_count and freed >= excess_bytes:
                break
            count += 1
            freed += size
            last_id = msg_id
        conn.execute("DELETE FROM messages WHERE id <= ?", (last_id,))
        conn.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (count,))
        return count, freed

    def _after_insert(self, size: int, dropped: tuple[int, int]) -> None:
        """Update the in-memory totals once the transaction has committed."""
        self._depth += 1 - dropped[0]
        self._bytes += size - dropped[1]

    # -- reading ---------------------------------------------------------------------

    def pending(self, limit: int, *, after: int = 0) -> list[OutboxMessage]:
        """Up to `limit` stored messages with id greater than `after`, oldest first."""
        try:
            rows = self._conn.execute(
                "SELECT id, topic, payload, qos FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox read failed: {exc}") from exc
        return [OutboxMessage(msg_id=r[0], topic=r[1], payload=bytes(r[2]), qos=r[3]) for r in rows]

    def depth(self) -> int:
        """How many messages wait for acknowledgement."""
        return self._depth

    def size_bytes(self) -> int:
        """Bytes (topic + payload) held by the waiting messages."""
        return self._bytes

    @property
    def dropped(self) -> int:
        """Messages deleted unsent because the outbox was full, over its whole life."""
        return self._counter(self._conn, "dropped")

    @property
    def last_seq(self) -> int:
        """The last telemetry sequence number allocated (0 before the first)."""
        return self._counter(self._conn, "seq")

    @staticmethod
    def _counter(conn: sqlite3.Connection, name: str) -> int:
        try:
            row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        except sqlite3.Error as exc:
            raise OutboxError(f"outbox read failed: {exc}") from exc
        if row is None:
            raise OutboxError(f"outbox counter {name!r} is missing")
        return int(row[0])
