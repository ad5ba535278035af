"""The full-collection schedule: the decision, and the task against the real collector."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time

import pytest

from shared.gc_policy import (
    FullCollectionPolicy,
    full_collection_due,
    resident_bytes,
    run_collector,
)

POLICY = FullCollectionPolicy(interval=300.0, growth=0.5)


@pytest.mark.parametrize(
    ("now", "rss", "baseline", "due"),
    [
        (100.0, 1000, 1000, False),  # neither old enough nor grown
        (300.0, 1000, 1000, True),  # the interval has passed
        (100.0, 1501, 1000, True),  # grown by more than half
        (100.0, 1500, 1000, False),  # grown by exactly half: not yet
        (100.0, None, 1000, False),  # RSS unknown: by the clock alone
        (400.0, None, None, True),
    ],
)
def test_full_collection_due(now: float, rss: int | None, baseline: int | None, due: bool) -> None:
    assert full_collection_due(POLICY, now, 0.0, rss, baseline) is due


@pytest.mark.parametrize("field", ["interval", "growth", "check_every"])
def test_policy_refuses_non_positive_values(field: str) -> None:
    with pytest.raises(ValueError, match="positive"):
        FullCollectionPolicy(**{field: 0.0})


def test_resident_bytes_reads_this_process() -> None:
    rss = resident_bytes()
    assert rss is not None and rss > 1_000_000


async def test_collector_takes_over_full_collections_and_gives_them_back() -> None:
    before = gc.get_threshold()
    full_runs = gc.get_stats()[2]["collections"]
    policy = FullCollectionPolicy(interval=0.05, check_every=0.01)
    task = asyncio.create_task(run_collector(policy))
    deadline = time.monotonic() + 10
    while gc.get_stats()[2]["collections"] < full_runs + 2:
        assert time.monotonic() < deadline, "no scheduled full collection happened"
        await asyncio.sleep(0.01)
    # While it runs, CPython's own schedule never starts a full collection.
    assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > 10**6
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert gc.get_threshold() == before


async def test_collector_runs_early_when_the_process_grows() -> None:
    full_runs = gc.get_stats()[2]["collections"]
    sizes = iter([1000, 1000, 1600])  # start, first check (no), second check (grown)
    policy = FullCollectionPolicy(interval=3600, growth=0.5, check_every=0.01)
    task = asyncio.create_task(run_collector(policy, rss=lambda: next(sizes, 1600)))
    deadline = time.monotonic() + 10
    while gc.get_stats()[2]["collections"] == full_runs:
        assert time.monotonic() < deadline, "growth did not trigger a full collection"
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
