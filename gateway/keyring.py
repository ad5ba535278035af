"""The running gateway's signing keys: which one signs, which verify, and moving them.

Owns: loading the key files named by the registry's signing-key records, the
`KeySet` that verifiers use (current and unexpired previous keys only), and moving
keys through `gateway.signing_keys` (rotate, expire, retire now) with the registry
and the key files kept consistent. Must not: sign or verify tokens itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import RegistryError
from gateway.registry import Registry
from gateway.signing_keys import KeyRecord, active_kids, apply, current_kid, expired
from gateway.statedir import StateDir
from shared.keyset import KeySet, SigningKey
from shared.tokens import LEEWAY_SECONDS

__all__ = ["KeyRing", "create_first_key", "expire_keys", "retire_key_now", "rotate_keys"]


@dataclass(frozen=True, slots=True)
class KeyRing:
    """A snapshot: the signing key and the verification key set at one instant."""

    signing: SigningKey
    verifying: KeySet
    records: tuple[KeyRecord, ...]

    @classmethod
    def load(cls, state: StateDir, registry: Registry, now: float) -> KeyRing:
        records = tuple(registry.signing_keys())
        signing = state.load_signing_key(current_kid(records))
        keys = {signing.kid: signing.public_key}
        for kid in active_kids(records, now) - {signing.kid}:
            keys[kid] = state.load_signing_key(kid).public_key
        return cls(signing=signing, verifying=KeySet(keys), records=records)

    def retired_kids(self, now: float) -> frozenset[str]:
        return frozenset(r.kid for r in self.records) - active_kids(self.records, now)

    def next_expiry(self) -> float | None:
        """When the next previous key stops verifying, if any."""
        times = [r.retire_after for r in self.records if r.state == "previous" and r.retire_after]
        return min(times, default=None)


def create_first_key(state: StateDir, registry: Registry, now: float) -> SigningKey:
    key = SigningKey.generate()
    state.write_signing_key(key)
    registry.put_signing_key(KeyRecord(kid=key.kid, state="current", created_at=now))
    return key


def rotate_keys(state: StateDir, registry: Registry, now: float, max_token_life: float) -> str:
    """Make a new key current; the old one verifies until its last token has expired."""
    records = registry.signing_keys()
    old = next(r for r in records if r.kid == current_kid(records))
    key = SigningKey.generate()
    state.write_signing_key(key)
    age = max_token_life + LEEWAY_SECONDS
    registry.put_signing_keys(
        [
            apply(old, "rotate", now, max_token_age=age),
            KeyRecord(kid=key.kid, state="current", created_at=now),
        ]
    )
    return key.kid


def retire_key_now(
    state: StateDir, registry: Registry, kid: str, now: float, max_token_life: float
) -> str | None:
    """End `kid` at once; if it was the current key a new one takes over (returned)."""
    record = next((r for r in registry.signing_keys() if r.kid == kid), None)
    if record is None:
        raise RegistryError(f"no signing key {kid!r}")
    if record.state == "retired":
        raise RegistryError(f"signing key {kid!r} is already retired")
    new_kid = None
    if record.state == "current":
        new_kid = rotate_keys(state, registry, now, max_token_life)
        record = next(r for r in registry.signing_keys() if r.kid == kid)
    registry.put_signing_keys([apply(record, "retire_now", now, max_token_age=0)])
    return new_kid


def expire_keys(registry: Registry, now: float) -> list[str]:
    """Retire previous keys whose tokens have all expired; returns their kids."""
    due = expired(registry.signing_keys(), now)
    if due:
        registry.put_signing_keys([apply(r, "expire", now, max_token_age=0) for r in due])
    return [r.kid for r in due]
