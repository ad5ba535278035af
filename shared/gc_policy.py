"""When the cyclic garbage collector may stop a long-running asyncio process.

Owns: the full-collection schedule of the gateway and the simulator. CPython 3.11 runs
a full (generation 2) collection whenever the objects that survived the young
generations exceed a quarter of the old ones. A full pass walks every tracked object:
with thousands of live connections it stopped the gateway's event loop for up to 0.9 s,
every 3 to 13 s, at 5,000 MQTT connections, and found nothing to free (the objects that
age into generation 2 there, such as keep-alive timers, die by reference counting).
Here young collections run as before; full ones run on a schedule, `interval` seconds
apart, or sooner when the process has grown by `growth` since the last one, which
bounds both how often the loop stops and how much unreachable cycles can hold.

`full_collection_due` is the decision, a plain function; `run_collector` is the asyncio
task that applies it. Must not: collect or change thresholds on import.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = ["FullCollectionPolicy", "full_collection_due", "resident_bytes", "run_collector"]

# A generation-2 threshold that the young collections never reach (the count grows by
# one per generation-1 collection).
_NEVER: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class FullCollectionPolicy:
    """`interval` s between full collections at most; sooner after `growth` more RSS."""

    interval: float = 300.0
    growth: float = 0.5
    check_every: float = 5.0

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.growth <= 0 or self.check_every <= 0:
            raise ValueError("interval, growth and check_every must be positive")


def full_collection_due(
    policy: FullCollectionPolicy,
    now: float,
    last_full_at: float,
    rss: int | None,
    rss_after_last_full: int | None,
) -> bool:
    """Whether to run a full collection now (RSS unknown: by the clock alone)."""
    if now - last_full_at >= policy.interval:
        return True
    if rss is None or rss_after_last_full is None:
        return False
    return rss > rss_after_last_full * (1.0 + policy.growth)


def resident_bytes() -> int | None:
    """This process's resident set size, or None where /proc is not available."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


async def run_collector(
    policy: FullCollectionPolicy,
    *,
    clock: Callable[[], float] = time.monotonic,
    rss: Callable[[], int | None] = resident_bytes,
) -> None:
    """Own the full collections until cancelled; CPython's thresholds come back then."""
    young0, young1, old = gc.get_threshold()
    gc.set_threshold(young0, young1, _NEVER)
    try:
        last_full_at, baseline = clock(), rss()
        while True:
            await asyncio.sleep(policy.check_every)
            if full_collection_due(policy, clock(), last_full_at, rss(), baseline):
                gc.collect()
                last_full_at, baseline = clock(), rss()
    finally:
        gc.set_threshold(young0, young1, old)
