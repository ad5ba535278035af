"""The agent's token schedule (`agent.tokens`): pure functions and the keeper's arithmetic."""

from __future__ import annotations

import asyncio
import random
from typing import cast

from agent.gateway_client import GatewayClient, TokenGrant
from agent.tokens import REFRESH_WINDOW, TokenKeeper, backoff_delay, refresh_delay


def test_refresh_falls_inside_the_window_and_uses_all_of_it() -> None:
    rng = random.Random(7)
    delays = [refresh_delay(300, rng) for _ in range(5000)]
    low, high = REFRESH_WINDOW
    assert all(300 * low <= d <= 300 * high for d in delays)
    # A fleet that got its tokens together spreads its refreshes over the whole window:
    # no 9 s bucket of the 90 s window holds much more than its tenth.
    buckets = [0] * 10
    for d in delays:
        buckets[min(9, int((d - 150) / 9))] += 1
    assert max(buckets) < 5000 / 10 * 1.2
    assert min(buckets) > 5000 / 10 * 0.8


def test_at_least_a_fifth_of_the_life_is_left_for_retries() -> None:
    rng = random.Random(1)
    assert all(60 - refresh_delay(60, rng) >= 12 for _ in range(1000))


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(3)
    assert all(0 <= backoff_delay(0, rng) <= 1 for _ in range(100))
    assert all(0 <= backoff_delay(3, rng) <= 8 for _ in range(100))
    assert max(backoff_delay(30, rng) for _ in range(1000)) <= 60


class FixedGrants:
    """Stands in for the HTTPS client: the keeper's schedule is plain arithmetic."""

    idle_reuse = 20.0

    def __init__(self, expires_in: int) -> None:
        self.expires_in = expires_in
        self.closed = 0

    def token(self, device_id: str) -> TokenGrant:
        return TokenGrant(f"token-of-{device_id}", self.expires_in, clock_offset=None)

    def close(self) -> None:
        self.closed += 1


def test_keeper_draws_the_refresh_time_once_per_token() -> None:
    now = [1_000_000.0]
    grants = FixedGrants(300)
    keeper = TokenKeeper(cast(GatewayClient, grants), "dev", random.Random(5), lambda: now[0])
    assert keeper.refresh_in() == 0.0  # no token yet: fetch one now
    asyncio.run(keeper.fetch())
    first = keeper.refresh_in()
    assert 150 <= first <= 240
    assert keeper.refresh_in() == first  # the same answer however often it is asked
    now[0] += 100
    assert keeper.refresh_in() == first - 100
    now[0] += 1000
    assert keeper.refresh_in() == 0.0
    assert grants.closed == 1  # next refresh far beyond idle_reuse: connection given back
