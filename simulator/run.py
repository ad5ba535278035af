"""One simulation run from start to report: the order of phases and who cleans up.

Owns: the run's lifecycle: a temporary directory, the gateway (embedded subprocess,
or the one `--gateway-dir` names), the fleet and the verifying subscriber, the
scenario's hooks in their place, the delivery check with its deadline, and tearing
everything down in reverse order whatever happened. Returns the report dictionary and
the raw latency samples (for the HTML charts).
Must not: parse arguments or print the final report (`simulator.cli` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.enrollment import enroll
from gateway.config import GatewaySettings
from gateway.open_files import raise_open_file_limit
from shared.acl import rules_from_cli
from shared.gc_policy import FullCollectionPolicy, run_collector
from simulator.console import PhaseProgress
from simulator.fleet import Fleet, FleetOptions, wait_until
from simulator.gateway_process import (
    Gateway,
    GatewayError,
    embedded_gateway,
    existing_gateway,
)
from simulator.ledger import DeliveryLedger
from simulator.metrics import Metrics
from simulator.report import DeviceCounts, build_report, environment, process_usage
from simulator.scenario import RunContext, RunOptions, Scenario
from simulator.scenarios import make_scenario
from simulator.verifier import TELEMETRY_FILTER, Verifier

__all__ = ["RunResult", "run_simulation"]

log = logging.getLogger("gatepass.simulator")

VERIFIER_READY_TIMEOUT_S = 30.0
VERIFIER_OUTAGE_S = 120.0
"""How long the verifier may be offline (reconnecting) without the gateway dropping its messages."""


@dataclass(frozen=True, slots=True)
class RunResult:
    report: dict[str, Any]
    samples: Mapping[str, list[float]]


async def run_simulation(options: RunOptions, progress: PhaseProgress) -> RunResult:
    scenario = make_scenario(options.scenario)
    rng = random.Random(options.seed)
    loop = asyncio.get_running_loop()
    threads = max(options.enroll_concurrency, 32) + 8
    loop.set_default_executor(ThreadPoolExecutor(threads, thread_name_prefix="sim"))
    # Thousands of devices' objects make each of Python's own full collections stop the
    # loop for a third of a second: that would show up as the simulated fleet's latency.
    collector = asyncio.create_task(run_collector(FullCollectionPolicy()), name="gc-schedule")
    # A socket per device; the embedded gateway inherits this and raises its own further.
    files = raise_open_file_limit(options.devices)
    if files.warning:
        progress.say(files.warning)
    try:
        async with _workspace(options) as run_dir, _gateway(options, scenario, run_dir) as gw:
            endpoints = gw.require_endpoints()
            kind = "embedded" if gw.embedded else "external"
            progress.say(f"gateway ({kind}): {endpoints.https} {endpoints.mqtt}")
            return await _run(options, scenario, gw, run_dir, progress, rng)
    finally:
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector


async def _run(
    options: RunOptions,
    scenario: Scenario,
    gateway: Gateway,
    run_dir: Path,
    progress: PhaseProgress,
    rng: random.Random,
) -> RunResult:
    metrics, ledger = Metrics(), DeliveryLedger()
    prefix = f"sim{secrets.token_hex(3)}"
    fleet = Fleet(
        gateway,
        FleetOptions(
            devices=options.devices,
            interval=options.interval,
            prefix=prefix,
            enroll_concurrency=options.enroll_concurrency,
            connect_concurrency=options.connect_concurrency,
        ),
        metrics=metrics,
        ledger=ledger,
        run_dir=run_dir,
        progress=progress,
        rng=rng,
    )
    ctx = RunContext(
        options=options, gateway=gateway, fleet=fleet, metrics=metrics, rng=rng, say=progress.say
    )
    verifier: Verifier | None = None
    try:
        await _timed(metrics, "register", fleet.register())
        await _timed(metrics, "enroll", fleet.enroll())
        verifier = await _start_verifier(gateway, f"{prefix}-verifier", run_dir, ledger, metrics)
        ctx.verifier = verifier
        await _timed(metrics, "token", fleet.fetch_tokens())
        await _timed(metrics, "connect", fleet.connect())
        await scenario.before_run(ctx)
        ctx.steady_started = time.monotonic()
        await _timed(metrics, "steady", fleet.publish(options.duration, scenario.during_run(ctx)))
        await _timed(metrics, "drain", fleet.drain(options.drain_timeout))
        delivered = await _timed(
            metrics, "deliver", wait_until(ledger.complete, options.delivery_timeout)
        )
        if not delivered:
            metrics.error("delivery_timeout")
        outcome = await scenario.after_run(ctx)
    finally:
        await fleet.stop()
        if verifier is not None:
            await verifier.stop()
            for kind, n in verifier.stats.errors.items():
                metrics.error(f"verifier_{kind}", n)
    report = build_report(
        options=options,
        scenario=scenario.name,
        summary=scenario.summary,
        devices=DeviceCounts(
            requested=options.devices,
            enrolled=len(fleet.enrolled),
            connected=len(fleet.connected),
        ),
        verdict=ledger.verdict(),
        metrics=metrics,
        outcome=outcome,
        env=environment(),
        resources=process_usage(gateway.pid if gateway.embedded else None),
    )
    return RunResult(report, metrics.latencies)


async def _timed(metrics: Metrics, name: str, work: Any) -> Any:
    started = time.monotonic()
    try:
        return await work
    finally:
        metrics.phase_took(name, time.monotonic() - started)


async def _start_verifier(
    gateway: Gateway, device_id: str, run_dir: Path, ledger: DeliveryLedger, metrics: Metrics
) -> Verifier:
    rules = rules_from_cli([], [TELEMETRY_FILTER], [])
    secrets_by_id = await asyncio.to_thread(gateway.register, [device_id], rules)
    endpoints = gateway.require_endpoints()
    result = await asyncio.to_thread(
        enroll,
        run_dir / "verifier",
        endpoints.https,
        gateway.ca_file,
        device_id,
        secrets_by_id[device_id],
        endpoints.mqtt,
    )

    def delivered(device: str, seq: int, outcome: object, seconds: float) -> None:
        metrics.latency("delivery", seconds)
        metrics.event("delivered")

    verifier = Verifier(result.identity, ledger, on_delivery=delivered)
    verifier.start()
    try:
        await asyncio.wait_for(verifier.subscribed.wait(), VERIFIER_READY_TIMEOUT_S)
    except TimeoutError:
        await verifier.stop()
        raise GatewayError(
            f"the verifying subscriber could not subscribe within {VERIFIER_READY_TIMEOUT_S:.0f} s"
            f" ({dict(verifier.stats.errors) or 'no error'})"
        ) from None
    return verifier


@asynccontextmanager
async def _workspace(options: RunOptions) -> AsyncIterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="gatepass-sim-"))
    try:
        yield root
    finally:
        if not options.keep:
            shutil.rmtree(root, ignore_errors=True)


def verifier_queue(options: RunOptions) -> int:
    """Offline queue for the embedded gateway: the verifier takes every device's traffic.

    It reconnects for each new token like any device; at 5,000 devices a reading every
    10 s, the gateway's default 1,000 messages would last it 2 s.
    """
    rate = options.devices / max(options.interval, 0.001)
    default = int(GatewaySettings.model_fields["mqtt_offline_queue"].default)
    return max(default, math.ceil(rate * VERIFIER_OUTAGE_S))


@asynccontextmanager
async def _gateway(
    options: RunOptions, scenario: Scenario, run_dir: Path
) -> AsyncIterator[Gateway]:
    if options.gateway_dir is not None:
        yield existing_gateway(options.gateway_dir)
        return
    env = {"GATEPASS_MQTT_OFFLINE_QUEUE": str(verifier_queue(options))}
    env.update(scenario.gateway_env(options))
    if options.token_lifetime is not None:
        env["GATEPASS_TOKEN_LIFETIME"] = str(options.token_lifetime)
    gateway = await asyncio.to_thread(embedded_gateway, run_dir / "gateway", env)
    try:
        yield gateway
    finally:
        await asyncio.to_thread(gateway.stop)
