"""Latency summaries, histograms and throughput over time: pure numbers, no I/O.

Owns: percentiles by the nearest-rank method (p50, p95, p99, max), log-spaced histogram
bins for the report's charts, and per-second throughput buckets. Time is always a
parameter (seconds since the run started); nothing here reads a clock.
Must not: measure, print or render anything.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HistogramBin",
    "LatencySummary",
    "Timeline",
    "histogram",
    "percentile",
    "spread",
    "summarize",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencySummary:
    """Milliseconds; every figure is None when there was no sample."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "p50": self.p50,
            "p95": self.p95,
            "p99": self.p99,
            "max": self.max,
            "count": self.count,
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence (q in (0, 100])."""
    if not ordered:
        raise ValueError("no samples")
    if not 0 < q <= 100:
        raise ValueError(f"percentile out of range: {q}")
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


def summarize(samples_ms: Iterable[float]) -> LatencySummary:
    ordered = sorted(samples_ms)
    if not ordered:
        return LatencySummary(count=0, p50=None, p95=None, p99=None, max=None)
    return LatencySummary(
        count=len(ordered),
        p50=_r(percentile(ordered, 50)),
        p95=_r(percentile(ordered, 95)),
        p99=_r(percentile(ordered, 99)),
        max=_r(ordered[-1]),
    )


def spread(values: list[int]) -> dict[str, Any]:
    """Min, mean (two decimals) and max of per-device counts; None each when empty."""
    if not values:
        return {"min": None, "mean": None, "max": None}
    return {"min": min(values), "mean": round(statistics.fmean(values), 2), "max": max(values)}


def _r(value: float) -> float:
    return round(value, 3)


@dataclass(frozen=True, slots=True)
class HistogramBin:
    low: float
    high: float
    count: int


def histogram(samples_ms: Sequence[float], bins_per_decade: int = 8) -> list[HistogramBin]:
    """Log-spaced bins from the smallest to the largest sample (latencies span decades)."""
    if not samples_ms:
        return []
    floor = 0.01
    lo = max(min(samples_ms), floor)
    hi = max(max(samples_ms), lo * 1.0001)
    start = math.floor(math.log10(lo) * bins_per_decade)
    stop = math.ceil(math.log10(hi) * bins_per_decade)
    stop = max(stop, start + 1)
    edges = [10 ** (i / bins_per_decade) for i in range(start, stop + 1)]
    counts = [0] * (len(edges) - 1)
    for value in samples_ms:
        v = max(value, floor)
        index = math.floor(math.log10(v) * bins_per_decade) - start
        counts[min(max(index, 0), len(counts) - 1)] += 1
    return [HistogramBin(edges[i], edges[i + 1], c) for i, c in enumerate(counts)]


@dataclass(slots=True)
class Timeline:
    """Events per whole second since the start, per kind (sent, acked, delivered...)."""

    kinds: tuple[str, ...] = ("sent", "acked", "delivered")
    _buckets: dict[str, dict[int, int]] = field(default_factory=dict)

    def add(self, kind: str, at: float, n: int = 1) -> None:
        if at < 0:
            at = 0.0
        bucket = self._buckets.setdefault(kind, {})
        second = int(at)
        bucket[second] = bucket.get(second, 0) + n

    def series(self) -> list[dict[str, int]]:
        """One row per second from 0 to the last second seen: {"t": s, kind: count...}."""
        last = max((max(b) for b in self._buckets.values() if b), default=-1)
        rows = []
        for second in range(last + 1):
            row = {"t": second}
            for kind in self._all_kinds():
                row[kind] = self._buckets.get(kind, {}).get(second, 0)
            rows.append(row)
        return rows

    def _all_kinds(self) -> list[str]:
        extra = sorted(k for k in self._buckets if k not in self.kinds)
        return [*self.kinds, *extra]
