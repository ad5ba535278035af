"""The contract between a run and its scenario: hooks, the context they get, outcomes.

Owns: `Scenario` (a structural protocol: any object with these members is one; no base
class to inherit), `RunContext` (what a hook may use: the options, the gateway, the
fleet, the metrics, a seeded RNG, a clock for the steady phase) and `ScenarioOutcome`
(extra report fields and failures). The order of a run is:

    gateway_env(options)      settings for an embedded gateway (GATEPASS_* variables)
    enroll, token, connect    (the fleet)
    before_run(ctx)           once, just before steady publishing starts
    during_run(ctx)           a task alongside steady publishing; `await ctx.at(t)` to
                              act t seconds into it; cancelled if still running at the end
    drain, delivery check     (the fleet and the verifier)
    after_run(ctx)            -> ScenarioOutcome: `extra` goes into the report under
                              `scenario`; any `failures` make the run exit non-zero

Attacks are counted with `ctx.metrics.attacks.attempt(kind, refused=...)`; one not
refused makes the run fail. Must not: implement scenarios (`simulator.scenarios` and
the modules it registers do).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from simulator.metrics import Metrics

if TYPE_CHECKING:
    from simulator.fleet import Fleet
    from simulator.gateway_process import Gateway
    from simulator.verifier import Verifier

__all__ = ["RunContext", "RunOptions", "Scenario", "ScenarioFactory", "ScenarioOutcome"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """Everything `gatepass-sim run` was asked to do (validated by the CLI)."""

    devices: int = 20
    duration: float = 10.0
    interval: float = 1.0
    token_lifetime: int | None = None
    scenario: str = "steady"
    gateway_dir: Path | None = None
    json_path: Path | None = None
    html_path: Path | None = None
    enroll_concurrency: int = 16
    connect_concurrency: int = 64
    drain_timeout: float = 30.0
    delivery_timeout: float = 15.0
    keep: bool = False
    seed: int | None = None


@dataclass(slots=True, kw_only=True)
class ScenarioOutcome:
    extra: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


@dataclass(slots=True, kw_only=True)
class RunContext:
    options: RunOptions
    gateway: Gateway
    fleet: Fleet
    metrics: Metrics
    rng: random.Random
    say: Callable[[str], None]
    """Print one line of progress for people."""
    steady_started: float | None = None
    """`time.monotonic()` when steady publishing began."""
    verifier: Verifier | None = None
    """The verifying subscriber (set before `before_run`); `observers` see every delivery."""

    def elapsed(self) -> float:
        """Seconds into the steady phase (0 before it starts)."""
        if self.steady_started is None:
            return 0.0
        return time.monotonic() - self.steady_started

    async def at(self, t: float) -> None:
        """Sleep until `t` seconds into the steady phase."""
        await asyncio.sleep(max(0.0, t - self.elapsed()))


class Scenario(Protocol):
    name: str
    summary: str

    def gateway_env(self, options: RunOptions) -> Mapping[str, str]: ...

    async def before_run(self, ctx: RunContext) -> None: ...

    async def during_run(self, ctx: RunContext) -> None: ...

    async def after_run(self, ctx: RunContext) -> ScenarioOutcome: ...


ScenarioFactory = Callable[[], Scenario]
"""Makes a fresh scenario object for one run (scenarios may keep per-run state)."""
