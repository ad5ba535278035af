"""The simulator's pure bookkeeping: delivery ledger, percentiles, histograms, timeline."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulator.ledger import Delivery, DeliveryLedger
from simulator.stats import Timeline, histogram, percentile, summarize


def ledger_with(device: str, sent: int, acked: int) -> DeliveryLedger:
    ledger = DeliveryLedger([device])
    for seq in range(1, sent + 1):
        ledger.sent(device, seq)
    for seq in range(1, acked + 1):
        ledger.acked(device, seq)
    return ledger


def test_everything_delivered_once_is_complete() -> None:
    ledger = ledger_with("d1", 5, 5)
    assert [ledger.delivered("d1", s) for s in range(1, 6)] == [Delivery.NEW] * 5
    assert ledger.complete() and ledger.all_acked()
    v = ledger.verdict()
    assert (v.sent, v.acked, v.delivered, v.lost, v.duplicates, v.reordered) == (5, 5, 5, 0, 0, 0)


def test_a_missing_acknowledged_message_is_lost_after_ack() -> None:
    ledger = ledger_with("d1", 5, 5)
    for seq in (1, 2, 4, 5):
        ledger.delivered("d1", seq)
    v = ledger.verdict()
    assert not ledger.complete()
    assert (v.lost, v.lost_after_ack, v.unacked) == (1, 1, 0)
    assert v.gaps == {"d1": [3]}


def test_unacknowledged_and_undelivered_is_lost_but_not_after_ack() -> None:
    ledger = ledger_with("d1", 4, 2)
    ledger.delivered("d1", 1)
    ledger.delivered("d1", 2)
    v = ledger.verdict()
    assert (v.lost, v.lost_after_ack, v.unacked) == (2, 0, 2)


def test_duplicates_and_reordering_are_counted_not_lost() -> None:
    ledger = ledger_with("d1", 3, 3)
    outcomes = [ledger.delivered("d1", s) for s in (1, 3, 2, 3, 1)]
    assert outcomes == [
        Delivery.NEW,
        Delivery.NEW,
        Delivery.REORDERED,
        Delivery.DUPLICATE,
        Delivery.DUPLICATE,
    ]
    v = ledger.verdict()
    assert (v.delivered, v.duplicates, v.reordered, v.lost) == (3, 2, 1, 0)


def test_foreign_devices_and_unsent_seqs_are_unknown() -> None:
    ledger = ledger_with("d1", 2, 2)
    assert ledger.delivered("other", 1) is Delivery.UNKNOWN
    assert ledger.delivered("d1", 3) is Delivery.UNKNOWN
    assert ledger.verdict().unknown == 2


def test_sent_must_be_contiguous() -> None:
    ledger = ledger_with("d1", 2, 0)
    with pytest.raises(ValueError, match="seq 4 sent after 2"):
        ledger.sent("d1", 4)


@given(st.lists(st.integers(min_value=1, max_value=30), max_size=100))
def test_ledger_counts_are_consistent(deliveries: list[int]) -> None:
    ledger = ledger_with("d", 30, 30)
    for seq in deliveries:
        ledger.delivered("d", seq)
    v = ledger.verdict()
    assert v.delivered == len(set(deliveries))
    assert v.duplicates == len(deliveries) - len(set(deliveries))
    assert v.lost == 30 - len(set(deliveries))
    assert ledger.verdict_counts() == (30, 30, v.delivered)


def test_percentiles_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7.0], 95) == 7
    s = summarize(reversed(values))
    assert (s.count, s.p50, s.p95, s.p99, s.max) == (100, 50, 95, 99, 100)
    assert summarize([]).as_dict() == {
        "p50": None,
        "p95": None,
        "p99": None,
        "max": None,
        "count": 0,
    }
    with pytest.raises(ValueError):
        percentile([], 50)


@given(st.lists(st.floats(min_value=0, max_value=1e5), min_size=1, max_size=200))
def test_histogram_counts_every_sample(samples: list[float]) -> None:
    bins = histogram(samples)
    assert sum(b.count for b in bins) == len(samples)
    assert all(b.low < b.high for b in bins)


def test_timeline_fills_empty_seconds() -> None:
    t = Timeline()
    t.add("sent", 0.2)
    t.add("sent", 0.9)
    t.add("delivered", 2.5, 3)
    assert t.series() == [
        {"t": 0, "sent": 2, "acked": 0, "delivered": 0},
        {"t": 1, "sent": 0, "acked": 0, "delivered": 0},
        {"t": 2, "sent": 0, "acked": 0, "delivered": 3},
    ]
