"""The simulator's report, verdict, HTML page and scenario registry (no sockets)."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import pytest

from simulator.html import render_html
from simulator.ledger import DeliveryLedger
from simulator.metrics import Metrics
from simulator.report import DeviceCounts, build_report, run_failures
from simulator.scenario import RunOptions, ScenarioOutcome
from simulator.scenarios import SCENARIOS, make_scenario, scenario_names

SPEC_LATENCIES = ("enroll", "token", "connect", "puback", "delivery")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def sample_run(deliver: bool = True) -> tuple[Metrics, DeliveryLedger]:
    clock = FakeClock()
    metrics, ledger = Metrics(clock), DeliveryLedger(["d1", "d2"])
    for device in ("d1", "d2"):
        for seq in (1, 2, 3):
            clock.now += 0.4
            ledger.sent(device, seq)
            metrics.event("sent")
            ledger.acked(device, seq)
            metrics.event("acked")
            metrics.latency("puback", 0.002 * seq)
            if deliver or (device, seq) != ("d2", 2):
                ledger.delivered(device, seq)
                metrics.event("delivered")
                metrics.latency("delivery", 0.003 * seq)
    for kind in ("enroll", "token", "connect"):
        metrics.latency(kind, 0.05)
    return metrics, ledger


def report_for(
    metrics: Metrics, ledger: DeliveryLedger, outcome: ScenarioOutcome | None = None
) -> dict[str, Any]:
    return build_report(
        options=RunOptions(devices=2),
        scenario="steady",
        summary="test",
        devices=DeviceCounts(requested=2, enrolled=2, connected=2),
        verdict=ledger.verdict(),
        metrics=metrics,
        outcome=outcome or ScenarioOutcome(),
        env={"python": "3.11", "platform": "x", "cpu_count": 2},
        resources={},
    )


def test_report_has_the_spec_keys() -> None:
    r = report_for(*sample_run())
    assert r["devices"] == {"requested": 2, "enrolled": 2, "connected": 2}
    assert {"sent", "acked", "delivered", "lost", "duplicates"} <= set(r["messages"])
    assert (r["messages"]["sent"], r["messages"]["delivered"], r["messages"]["lost"]) == (6, 6, 0)
    for kind in SPEC_LATENCIES:
        assert {"p50", "p95", "p99", "max"} <= set(r["latency_ms"][kind])
    assert r["latency_ms"]["puback"]["max"] == pytest.approx(6.0)
    assert r["errors"] == {}
    assert r["attacks"]["attempted"] == r["attacks"]["refused"] == 0
    assert sum(row["sent"] for row in r["throughput"]) == 6
    assert r["ok"] and r["failures"] == []
    json.dumps(r)  # serialisable as it stands


def test_a_lost_message_fails_the_run() -> None:
    r = report_for(*sample_run(deliver=False))
    assert r["messages"]["lost"] == 1 and r["messages"]["lost_after_ack"] == 1
    assert r["gaps"] == {"d2": [2]}
    assert not r["ok"]
    assert r["failures"] == [
        "1 messages lost (1 of them acknowledged by the gateway, 0 never acknowledged)"
    ]


def test_an_attack_let_through_and_scenario_failures_fail_the_run() -> None:
    metrics, ledger = sample_run()
    metrics.attacks.attempt("forged_token", refused=True)
    metrics.attacks.attempt("topic_escalation", refused=False)
    r = report_for(metrics, ledger, ScenarioOutcome(extra={"x": 1}, failures=["promise broken"]))
    assert r["attacks"]["attempted"] == 2 and r["attacks"]["refused"] == 1
    assert r["attacks"]["by_kind"]["topic_escalation"] == {"attempted": 1, "refused": 0}
    assert r["scenario"]["x"] == 1
    assert r["failures"] == ["1 attacks were not refused", "promise broken"]


def test_devices_that_never_connected_fail_the_run() -> None:
    _, ledger = sample_run()
    failures = run_failures(
        DeviceCounts(requested=3, enrolled=2, connected=1), ledger.verdict(), 0, ScenarioOutcome()
    )
    assert failures == ["only 2 of 3 devices enrolled", "only 1 of 2 devices connected"]


def test_html_is_self_contained() -> None:
    metrics, ledger = sample_run(deliver=False)
    page = render_html(report_for(metrics, ledger), metrics.latencies)
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 1 + len(SPEC_LATENCIES)
    assert "FAILED" in page and "<polyline" in page
    for fetch in ("<script", "<link", "src=", "href=", "url("):
        assert fetch not in page


def test_scenario_registry() -> None:
    assert {"steady", "storm", "churn"} <= set(scenario_names())
    for name, factory in SCENARIOS.items():
        scenario = factory()
        assert scenario.name == name and scenario.summary
        for hook in ("before_run", "during_run", "after_run"):
            assert inspect.iscoroutinefunction(getattr(scenario, hook)), (name, hook)
        assert isinstance(dict(scenario.gateway_env(RunOptions())), dict)
    with pytest.raises(ValueError, match="unknown scenario 'nope'"):
        make_scenario("nope")


def test_churn_shortens_tokens_unless_told_otherwise() -> None:
    churn = make_scenario("churn")
    assert churn.gateway_env(RunOptions()) == {"GATEPASS_TOKEN_LIFETIME": "6"}
    assert churn.gateway_env(RunOptions(token_lifetime=9)) == {"GATEPASS_TOKEN_LIFETIME": "9"}


def test_steady_has_no_extra_promise() -> None:
    outcome = asyncio.run(make_scenario("steady").after_run(None))  # type: ignore[arg-type]
    assert outcome == ScenarioOutcome()
