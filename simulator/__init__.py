"""Gatepass simulator: fleets of virtual devices, each the real agent core.

Modules: `gateway_process` (the gateway under test), `fleet` (the devices),
`verifier` (the subscriber that checks every message), `ledger` and `stats` (pure
bookkeeping), `metrics`, `scenario` (the hook contract) and `scenarios` (the registry),
`report` and `html` (the output), `run` (a run's lifecycle), `cli` (`gatepass-sim`).
"""

from __future__ import annotations

from simulator.ledger import Delivery, DeliveryLedger, DeliveryVerdict
from simulator.scenario import RunContext, RunOptions, Scenario, ScenarioOutcome
from simulator.scenarios import SCENARIOS, make_scenario

__all__ = [
    "SCENARIOS",
    "Delivery",
    "DeliveryLedger",
    "DeliveryVerdict",
    "RunContext",
    "RunOptions",
    "Scenario",
    "ScenarioOutcome",
    "make_scenario",
]
