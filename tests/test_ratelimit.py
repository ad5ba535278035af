"""gateway.ratelimit: token buckets with time as a parameter, bounded memory."""

from __future__ import annotations

import pytest

from gateway.errors import TooManyRequests
from gateway.ratelimit import RateLimiter


def test_burst_then_refusal_with_retry_after() -> None:
    limiter = RateLimiter(rate_per_second=2.0, burst=3)
    for _ in range(3):
        limiter.check("a", 100.0)
    with pytest.raises(TooManyRequests) as info:
        limiter.check("a", 100.0)
    assert info.value.status == 429
    assert info.value.retry_after == pytest.approx(0.5)
    assert info.value.public == "too many requests"


def test_refill_is_proportional_to_elapsed_time_and_capped() -> None:
    limiter = RateLimiter(rate_per_second=1.0, burst=2)
    limiter.check("a", 0.0)
    limiter.check("a", 0.0)
    with pytest.raises(TooManyRequests) as info:
        limiter.check("a", 0.25)
    assert info.value.retry_after == pytest.approx(0.75)
    limiter.check("a", 1.0)
    limiter.check("a", 1000.0)
    limiter.check("a", 1000.0)
    with pytest.raises(TooManyRequests):
        limiter.check("a", 1000.0)


def test_keys_are_independent() -> None:
    limiter = RateLimiter(rate_per_second=0.1, burst=1)
    limiter.check("a", 0.0)
    limiter.check("b", 0.0)
    with pytest.raises(TooManyRequests):
        limiter.check("a", 0.0)


def test_a_refused_request_costs_nothing() -> None:
    limiter = RateLimiter(rate_per_second=1.0, burst=1)
    limiter.check("a", 0.0)
    for _ in range(5):
        with pytest.raises(TooManyRequests):
            limiter.check("a", 0.5)
    limiter.check("a", 1.0)


def test_ensure_available_takes_nothing_and_charge_takes_one() -> None:
    limiter = RateLimiter(rate_per_second=1.0, burst=2)
    for _ in range(5):
        limiter.ensure_available("a", 0.0)
    limiter.charge("a", 0.0)
    limiter.charge("a", 0.0)
    limiter.charge("a", 0.0)  # never below zero: one second refills one token
    with pytest.raises(TooManyRequests):
        limiter.ensure_available("a", 0.5)
    limiter.ensure_available("a", 1.0)


def test_clock_stepping_back_refills_nothing() -> None:
    limiter = RateLimiter(rate_per_second=1.0, burst=1)
    limiter.check("a", 50.0)
    with pytest.raises(TooManyRequests):
        limiter.check("a", 10.0)
    with pytest.raises(TooManyRequests):
        limiter.check("a", 50.5)
    limiter.check("a", 51.0)


def test_memory_is_bounded_and_least_recently_used_goes_first() -> None:
    limiter = RateLimiter(rate_per_second=0.001, burst=1, max_keys=3)
    limiter.check("a", 0.0)
    limiter.check("b", 0.0)
    limiter.check("c", 0.0)
    with pytest.raises(TooManyRequests):
        limiter.check("a", 0.0)  # touches "a": "b" is now the least recently used
    limiter.check("d", 0.0)
    assert len(limiter) == 3
    with pytest.raises(TooManyRequests):
        limiter.check("a", 0.0)
    limiter.check("b", 0.0)  # forgotten, so it comes back full
    for key in range(1000):
        limiter.check(f"k{key}", 1.0)
    assert len(limiter) == 3


@pytest.mark.parametrize(
    ("rate", "burst", "max_keys"), [(0.0, 1, 1), (-1.0, 1, 1), (1.0, 0, 1), (1.0, 1, 0)]
)
def test_invalid_parameters(rate: float, burst: int, max_keys: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst, max_keys)
