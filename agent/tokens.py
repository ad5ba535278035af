"""Access tokens on the device: when to refresh, how to back off, and the gateway's clock.

Owns: the refresh schedule (about two thirds into a token's life, with jitter, so a
fleet that booted together does not refresh together), exponential backoff with full
jitter after failures, and the clock offset learnt from the gateway's `Date` header
(devices without a real-time clock). The schedule functions are pure; `TokenKeeper`
is the small stateful wrapper the device loop uses. Must not: log a whole token.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.gateway_client import MAX_CLOCK_SKEW, GatewayClient, TokenGrant

__all__ = ["Token", "TokenKeeper", "backoff_delay", "redact", "refresh_delay"]

REFRESH_FRACTION = 2 / 3
REFRESH_JITTER = 0.1
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
    """Seconds after issuance to refresh: 2/3 of the life, +-10 %, never past 90 %."""
    jitter = 1 + rng.uniform(-REFRESH_JITTER, REFRESH_JITTER)
    return min(lifetime * REFRESH_FRACTION * jitter, lifetime * 0.9)


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
        token = self.current
        if token is None:
            return 0.0
        lifetime = token.expires_at - token.issued_at
        return max(0.0, token.issued_at + refresh_delay(lifetime, self._rng) - self.now())

    def _accept(self, grant: TokenGrant) -> Token:
        if grant.clock_offset is not None and abs(grant.clock_offset) > MAX_CLOCK_SKEW:
            self.clock_offset = grant.clock_offset
        now = self.now()
        self.current = Token(grant.access_token, now, now + grant.expires_in)
        return self.current
