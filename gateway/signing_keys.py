"""Token signing key lifecycle as a table: current -> previous -> retired.

Owns: the states of the ES256 signing keys and the legal moves between them, which
key signs, and which keys verify at a given instant. A key that stops signing keeps
verifying until every token it signed has expired (`retire_after`), then retires by
itself; `retire --now` ends it at once. Pure: time is a parameter, records are values;
persistence is the registry's job and key files are the state directory's.

    state      event        next state
    current    rotate       previous    (retire_after = now + max token life + leeway)
    previous   expire       retired     (when now >= retire_after)
    previous   retire_now   retired
    current    retire_now   retired     (only together with a rotate: never zero keys)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.errors import RegistryError

__all__ = [
    "TRANSITIONS",
    "KeyEvent",
    "KeyRecord",
    "KeyState",
    "active_kids",
    "apply",
    "current_kid",
    "due_for_rotation",
    "expired",
]

KeyState = Literal["current", "previous", "retired"]
KeyEvent = Literal["rotate", "expire", "retire_now"]

TRANSITIONS: dict[tuple[KeyState, KeyEvent], KeyState] = {
    ("current", "rotate"): "previous",
    ("current", "retire_now"): "retired",
    ("previous", "expire"): "retired",
    ("previous", "retire_now"): "retired",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRecord:
    """One signing key's lifecycle; times are Unix seconds."""

    kid: str
    state: KeyState
    created_at: float
    retire_after: float | None = None
    retired_at: float | None = None


def apply(record: KeyRecord, event: KeyEvent, now: float, *, max_token_age: float) -> KeyRecord:
    """The record after `event`; an illegal move raises `RegistryError`."""
    try:
        state = TRANSITIONS[(record.state, event)]
    except KeyError:
        raise RegistryError(f"key {record.kid} is {record.state}: cannot {event}") from None
    if state == "previous":
        return dataclasses.replace(record, state=state, retire_after=now + max_token_age)
    return dataclasses.replace(record, state=state, retired_at=now)


def current_kid(records: Iterable[KeyRecord]) -> str:
    """The one key that signs new tokens."""
    current = [r.kid for r in records if r.state == "current"]
    if len(current) != 1:
        raise RegistryError(f"expected exactly one current signing key, found {len(current)}")
    return current[0]


def _verifies(record: KeyRecord, now: float) -> bool:
    return record.state == "current" or (
        record.state == "previous" and record.retire_after is not None and now < record.retire_after
    )


def active_kids(records: Iterable[KeyRecord], now: float) -> frozenset[str]:
    """Keys whose tokens verify at `now`: the current one and unexpired previous ones."""
    return frozenset(r.kid for r in records if _verifies(r, now))


def expired(records: Sequence[KeyRecord], now: float) -> list[KeyRecord]:
    """Previous keys whose last token has expired: they retire by themselves."""
    return [
        r
        for r in records
        if r.state == "previous" and r.retire_after is not None and now >= r.retire_after
    ]


def due_for_rotation(records: Iterable[KeyRecord], now: float, period: float) -> bool:
    """Whether automatic rotation (every `period` seconds, 0 = off) is due."""
    return period > 0 and any(
        r.state == "current" and now - r.created_at >= period for r in records
    )
