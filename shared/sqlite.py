"""The SQLite files the agent and the gateway keep: opened one way, written one way.

Owns: creating a database file private to its owner (mode 0600, so SQLite's `-wal`
and `-shm` files inherit it), opening a connection in autocommit mode that threads may
share, configuring it (busy timeout, WAL journal, synchronous level, foreign keys),
and one IMMEDIATE write transaction that is durable as a whole or did not happen.
Must not: know any schema or any package's exceptions (a caller passes how a
`sqlite3.Error` becomes its own error); import anything beyond the standard library
(the agent uses it).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

__all__ = [
    "JournalModeRefused",
    "Synchronous",
    "configure",
    "connect",
    "create_private_file",
    "write_transaction",
]

Synchronous = Literal["FULL", "NORMAL"]


class JournalModeRefused(sqlite3.OperationalError):
    """SQLite would not switch the file to WAL mode (`mode` is what it reported)."""

    def __init__(self, mode: object) -> None:
        super().__init__(f"journal_mode WAL refused (got {mode})")
        self.mode = mode


def create_private_file(path: Path) -> None:
    """Create `path` with mode 0600 if missing, so SQLite's WAL files inherit it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


def connect(path: str | os.PathLike[str], *, timeout: float = 5.0) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), shareable by threads."""
    return sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)


def configure(
    conn: sqlite3.Connection,
    *,
    busy_timeout_ms: int,
    synchronous: Synchronous,
    foreign_keys: bool = False,
) -> None:
    """Busy timeout, WAL journal (`JournalModeRefused` if refused), synchronous level
    and, if asked, foreign key enforcement."""
    conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise JournalModeRefused(mode)
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    if foreign_keys:
        conn.execute("PRAGMA foreign_keys = ON")


@contextmanager
def write_transaction(
    conn: sqlite3.Connection, failed: Callable[[sqlite3.Error], Exception]
) -> Iterator[sqlite3.Connection]:
    """One IMMEDIATE write transaction: all of it is durable, or none of it happened.

    Committed if the block returns, rolled back if anything escapes it (or the COMMIT
    fails). A `sqlite3.Error` is raised as `failed(error)`, chained to it; other
    exceptions pass through unchanged.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise failed(exc) from exc
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise failed(exc) from exc
        raise
