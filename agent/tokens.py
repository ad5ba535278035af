"""Access tokens on the device: when to refresh, how to back off, and the gateway's clock.

Owns: the refresh schedule (at a uniformly random point between half and four fifths
of a token's life, drawn once per token, so that a fleet that booted together spreads
its refreshes, and the MQTT reconnects that go with them, over 30 % of a lifetime: 90 s
for the default 300 s tokens; at least a fifth of the life is left for retries),
exponential backoff with full jitter after failures, and the clock offset learnt from
the gateway's `Date` header (devices without a real-time clock). The schedule
functions are pure; `TokenKeeper` is the small stateful wrapper the device loop uses.
Must not: log a whole token.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.gateway_client import MAX_CLOCK_SKEW, GatewayClient, TokenGrant

__all__ = ["Token", "TokenKeeper", "backoff_delay", "redact", "refresh_delay"]

REFRESH_WINDOW = (0.5, 0.8)
"""Where in a token's life the refresh falls, uniformly (fractions of the lifetime)."""
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    issued_at: float
    """Local monotonic-free wall time when received, corrected by the clock offset."""
    expires_at: float

    def remaining(self, now: float) -> float:
        return self.expires_at - now


def redact(token: str) -> str:
    """What may appear in a log: the first characters of the signature only."""
    return f"…{token[-6:]}" if len(token) > 12 else "…"


def refresh_delay(lifetime: float, rng: random.Random) -> float:
    """Seconds after issuance to refresh: uniform in `REFRESH_WINDOW` of the life."""
    low, high = REFRESH_WINDOW
    return lifetime * rng.uniform(low, high)


def backoff_delay(
    attempt: int, rng: random.Random, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP
) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * 2 ** max(0, attempt)))


class TokenKeeper:
    """Fetches tokens over a kept-alive mTLS connection and knows when to refresh."""

    def __init__(
        self,
        client: GatewayClient,
        device_id: str,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._device_id = device_id
        self._rng = rng or random.Random()
        self._clock = clock
        self.clock_offset = 0.0
        self.current: Token | None = None
        self._refresh_at = 0.0

    def now(self) -> float:
        """Local time corrected to the gateway's clock when they differ by over 60 s."""
        return self._clock() + self.clock_offset

    async def fetch(self) -> Token:
        grant = await asyncio.to_thread(self._client.token, self._device_id)
        token = self._accept(grant)
        if self.refresh_in() >= self._client.idle_reuse:
            # The connection will be too old to reuse by then: a fleet should not hold a
            # descriptor per device (and the gateway a session) until it is dropped.
            self._client.close()
        return token

    def refresh_in(self) -> float:
        """Seconds until the current token should be refreshed (0 if there is none)."""
        if self.current is None:
            return 0.0
        return max(0.0, self._refresh_at - self.now())

    def _accept(self, grant: TokenGrant) -> Token:
        if grant.clock_offset is not None and abs(grant.clock_offset) > MAX_CLOCK_SKEW:
            self.clock_offset = grant.clock_offset
        now = self.now()
        self.current = Token(grant.access_token, now, now + grant.expires_in)
        self._refresh_at = now + refresh_delay(grant.expires_in, self._rng)
        return self.current
