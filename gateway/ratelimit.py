"""Token-bucket rate limiting keyed by a string (device id, source address).

Owns: one bucket per key holding up to `burst` tokens, refilled at
`rate_per_second`; the time is a parameter (any monotonic clock in seconds). Memory
is bounded: at most `max_keys` buckets are kept, the least recently used is dropped
first (a dropped bucket comes back full, which only ever errs toward letting a
client through, never toward locking one out).

Two ways to use it:

* `check(key, now)` takes a token or raises `TooManyRequests` (limit every request);
* `ensure_available(key, now)` before the work and `charge(key, now)` after a
  failure (limit failed attempts only: a correct secret is never slowed down by
  earlier failures of its own, an attacker is held to the rate).

Must not: read clocks, sleep, do I/O or know what the keys mean.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from gateway.errors import TooManyRequests

__all__ = ["RateLimiter"]

_PUBLIC: Final = "too many requests"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by string; see the module docstring."""

    __slots__ = ("_buckets", "burst", "max_keys", "rate_per_second")

    def __init__(self, rate_per_second: float, burst: int, max_keys: int = 100_000) -> None:
        if not rate_per_second > 0:
            raise ValueError("rate_per_second must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate_per_second = float(rate_per_second)
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """How many keys are tracked (bounded by `max_keys`)."""
        return len(self._buckets)

    def check(self, key: str, now: float) -> None:
        """Take one token for `key`, or raise `TooManyRequests` with `retry_after`."""
        bucket = self._refilled(key, now)
        self._require_token(key, bucket)
        bucket.tokens -= 1.0

    def ensure_available(self, key: str, now: float) -> None:
        """Raise `TooManyRequests` if `key` has no token left; take nothing."""
        self._require_token(key, self._refilled(key, now))

    def charge(self, key: str, now: float) -> None:
        """Take one token for `key` if there is one (e.g. after a failed attempt)."""
        bucket = self._refilled(key, now)
        bucket.tokens = max(0.0, bucket.tokens - 1.0)

    def _require_token(self, key: str, bucket: _Bucket) -> None:
        if bucket.tokens >= 1.0:
            return
        retry_after = (1.0 - bucket.tokens) / self.rate_per_second
        raise TooManyRequests(_PUBLIC, retry_after, cause=f"rate limit for {key!r}"[:200])

    def _refilled(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=float(self.burst), updated=now)
            self._buckets[key] = bucket
            self._evict()
            return bucket
        self._buckets.move_to_end(key)
        elapsed = max(0.0, now - bucket.updated)  # a clock stepping back refills nothing
        bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate_per_second)
        bucket.updated = max(bucket.updated, now)
        return bucket

    def _evict(self) -> None:
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
