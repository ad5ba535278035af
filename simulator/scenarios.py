"""The scenarios `gatepass-sim run --scenario NAME` knows, and their registry.

Owns: the registry `SCENARIOS` (name -> factory) and the scenarios that only drive
the agent's public API: `steady` (publish; nothing may be lost), `storm` (part way
through, every device drops its connection at once and must come back) and `churn`
(tokens so short-lived that every device refreshes and reconnects several times;
nothing may be lost). The others live in their own modules: `rotation`
(`simulator.rotation`), `revoke` (`simulator.revocation`), `attack`
(`simulator.attack`) and `chaos` (`simulator.chaos`). A scenario is any object with
the members of `simulator.scenario.Scenario`; add one by writing a class (here if it is
small and only uses the agent's public API, else in a module of its own) and an entry
in `SCENARIOS`.
Must not: drive honest devices beyond the agent's public API (`publish_reading`,
`request_reconnect`, `connected`, `stats`, `tokens`, `link.disconnected`), or touch
the report's fixed keys.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

from simulator.attack import SPEC_REFUSAL, Attack
from simulator.chaos import Chaos
from simulator.fleet import VirtualDevice, wait_until
from simulator.jws import token_kid
from simulator.revocation import Revoke
from simulator.rotation import Rotation
from simulator.scenario import RunContext, RunOptions, Scenario, ScenarioFactory, ScenarioOutcome
from simulator.stats import spread, summarize

__all__ = [
    "CHURN_TOKEN_LIFETIME_S",
    "SCENARIOS",
    "SPEC_REFUSAL",
    "make_scenario",
    "scenario_names",
    "token_kid",
]

CHURN_TOKEN_LIFETIME_S = 6
"""The gateway's minimum is 5 s; devices refresh between 50 % and 80 % of it."""
STORM_AT_FRACTION = 0.4
STORM_RECONNECT_TIMEOUT_S = 30.0


class Steady:
    name = "steady"
    summary = "every device publishes at --interval; nothing may be lost"

    def gateway_env(self, options: RunOptions) -> Mapping[str, str]:
        return {}

    async def before_run(self, ctx: RunContext) -> None:
        return None

    async def during_run(self, ctx: RunContext) -> None:
        return None

    async def after_run(self, ctx: RunContext) -> ScenarioOutcome:
        return ScenarioOutcome()


class Storm:
    """Every device reconnects at once, `STORM_AT_FRACTION` into the steady phase."""

    name = "storm"
    summary = "every device drops its connection at once and reconnects; nothing lost"

    def __init__(self) -> None:
        self.devices = 0
        self.reconnected = 0
        self.all_back_s: float | None = None

    def gateway_env(self, options: RunOptions) -> Mapping[str, str]:
        return {}

    async def before_run(self, ctx: RunContext) -> None:
        return None

    async def during_run(self, ctx: RunContext) -> None:
        await ctx.at(ctx.options.duration * STORM_AT_FRACTION)
        devices = [vd for vd in ctx.fleet.connected if vd.agent is not None]
        before = {vd.device_id: vd.require_agent().stats.connects for vd in devices}
        self.devices = len(devices)
        ctx.say(f"storm: {len(devices)} devices reconnect at t={ctx.elapsed():.1f} s")
        started = time.monotonic()
        for vd in devices:
            vd.require_agent().request_reconnect()

        def back() -> bool:
            self.reconnected = sum(1 for vd in devices if _reconnected(vd, before))
            return self.reconnected == len(devices)

        if await wait_until(back, STORM_RECONNECT_TIMEOUT_S):
            self.all_back_s = round(time.monotonic() - started, 3)
            ctx.say(f"storm: all {len(devices)} devices back in {self.all_back_s:.2f} s")

    async def after_run(self, ctx: RunContext) -> ScenarioOutcome:
        outcome = ScenarioOutcome(
            extra={
                "devices": self.devices,
                "reconnected": self.reconnected,
                "all_reconnected_s": self.all_back_s,
                "reconnect_ms": summarize(ctx.metrics.latencies.get("reconnect", [])).as_dict(),
            }
        )
        if self.devices == 0:
            outcome.failures.append("storm: the storm never happened (run too short?)")
        elif self.reconnected < self.devices:
            outcome.failures.append(
                f"storm: only {self.reconnected} of {self.devices} devices reconnected "
                f"within {STORM_RECONNECT_TIMEOUT_S:.0f} s"
            )
        return outcome


def _reconnected(vd: VirtualDevice, before: Mapping[str, int]) -> bool:
    agent = vd.require_agent()
    return agent.stats.connects > before[vd.device_id] and agent.connected.is_set()


class Churn:
    """Short-lived tokens: refresh and reconnect all the time, lose nothing."""

    name = "churn"
    summary = "short token lifetime: every device refreshes and reconnects repeatedly"

    def gateway_env(self, options: RunOptions) -> Mapping[str, str]:
        lifetime = options.token_lifetime or CHURN_TOKEN_LIFETIME_S
        return {"GATEPASS_TOKEN_LIFETIME": str(lifetime)}

    async def before_run(self, ctx: RunContext) -> None:
        return None

    async def during_run(self, ctx: RunContext) -> None:
        return None

    async def after_run(self, ctx: RunContext) -> ScenarioOutcome:
        agents = [vd.require_agent() for vd in ctx.fleet.connected]
        refreshes = [a.stats.token_refreshes for a in agents]
        reconnects = [max(0, a.stats.connects - 1) for a in agents]
        lifetimes = [
            t.expires_at - t.issued_at for a in agents if (t := a.tokens.current) is not None
        ]
        lifetime = round(statistics.median(lifetimes)) if lifetimes else None
        outcome = ScenarioOutcome(
            extra={
                "token_lifetime_s": lifetime,
                "token_refreshes": spread(refreshes),
                "reconnects": spread(reconnects),
            }
        )
        if lifetime and ctx.options.duration >= 2 * lifetime and agents:
            idle = sum(1 for n in reconnects if n == 0)
            if idle:
                outcome.failures.append(
                    f"churn: {idle} devices never reconnected with a fresh token "
                    f"(lifetime {lifetime} s, run {ctx.options.duration:g} s)"
                )
        return outcome


SCENARIOS: dict[str, ScenarioFactory] = {
    "steady": Steady,
    "storm": Storm,
    "churn": Churn,
    "rotation": Rotation,
    "revoke": Revoke,
    "attack": Attack,
    "chaos": Chaos,
}


def scenario_names() -> list[str]:
    return sorted(SCENARIOS)


def make_scenario(name: str) -> Scenario:
    try:
        factory = SCENARIOS[name]
    except KeyError:
        raise ValueError(
            f"unknown scenario {name!r} (choose from {', '.join(scenario_names())})"
        ) from None
    return factory()
