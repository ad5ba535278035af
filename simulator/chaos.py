"""The `chaos` scenario: the gateway is SIGKILLed mid-run and started again.

Owns: its promise and how it is checked: every device reconnects to the restarted
gateway on the same ports, and nothing is lost (the run's own verdict, as in `steady`).
Must not: drive devices beyond the agent's public API, or touch the report's fixed
keys. The crash and restart are `Gateway.restart(crash=True)`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from simulator.fleet import VirtualDevice, wait_until
from simulator.gateway_process import GatewayError
from simulator.scenario import RunContext, RunOptions, ScenarioOutcome
from simulator.stats import summarize

__all__ = ["Chaos"]

CHAOS_AT_FRACTION = 0.35
CHAOS_RECONNECT_TIMEOUT_S = 60.0


class Chaos:
    """The embedded gateway is SIGKILLed mid-run and started again on the same ports.

    Devices keep producing readings through the outage (their outboxes hold them);
    every device must reconnect, and after the drain everything sent must have been
    acknowledged and delivered exactly as in `steady` (the run's own verdict).
    """

    name = "chaos"
    summary = "the gateway is SIGKILLed and restarted mid-run; nothing may be lost"

    def __init__(self) -> None:
        self.devices: list[VirtualDevice] = []
        self.before: dict[str, int] = {}
        self.killed_at_s: float | None = None
        self.restart_s: float | None = None
        self.all_back_s: float | None = None
        self.problems: list[str] = []

    def gateway_env(self, options: RunOptions) -> Mapping[str, str]:
        return {}

    async def before_run(self, ctx: RunContext) -> None:
        return None

    async def during_run(self, ctx: RunContext) -> None:
        await ctx.at(ctx.options.duration * CHAOS_AT_FRACTION)
        self.devices = [vd for vd in ctx.fleet.connected if vd.agent is not None]
        self.before = {vd.device_id: vd.require_agent().stats.connects for vd in self.devices}
        self.killed_at_s = round(ctx.elapsed(), 3)
        ctx.say(f"chaos: SIGKILL to the gateway at t={self.killed_at_s:.1f} s")
        started = time.monotonic()
        try:
            await asyncio.to_thread(ctx.gateway.restart, crash=True)
        except GatewayError as exc:
            self.problems.append(f"chaos: the gateway could not be restarted: {exc}")
            return
        self.restart_s = round(time.monotonic() - started, 3)
        ctx.say(f"chaos: gateway back after {self.restart_s:.2f} s")
        if await wait_until(lambda: self._back() == len(self.devices), CHAOS_RECONNECT_TIMEOUT_S):
            self.all_back_s = round(time.monotonic() - started, 3)
            ctx.say(f"chaos: all {len(self.devices)} devices back after {self.all_back_s:.2f} s")

    def _back(self) -> int:
        return sum(
            1
            for vd in self.devices
            if vd.require_agent().stats.connects > self.before[vd.device_id]
        )

    async def after_run(self, ctx: RunContext) -> ScenarioOutcome:
        reconnected = self._back()
        verifier = ctx.verifier
        outcome = ScenarioOutcome(
            extra={
                "killed_at_s": self.killed_at_s,
                "restart_s": self.restart_s,
                "devices": len(self.devices),
                "reconnected": reconnected,
                "all_reconnected_s": self.all_back_s,
                "reconnect_ms": summarize(ctx.metrics.latencies.get("reconnect", [])).as_dict(),
                "verifier_connects": verifier.stats.connects if verifier is not None else None,
                "gateway_restarts": ctx.gateway.restarts,
            },
            failures=list(self.problems),
        )
        if self.killed_at_s is None:
            outcome.failures.append("chaos: the gateway was never killed (run too short?)")
        elif reconnected < len(self.devices):
            outcome.failures.append(
                f"chaos: only {reconnected} of {len(self.devices)} devices reconnected"
            )
        return outcome
