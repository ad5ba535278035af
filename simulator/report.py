"""The run's report: the JSON document, its verdict, and the table people read.

Owns: turning what a run measured (metrics, ledger verdict, scenario outcome,
environment) into the report dictionary with the SPEC's keys (`devices`, `messages`,
`latency_ms`, `errors`, `attacks`) and more, the list of failures that make the run
exit non-zero (a message lost, an attack let through, devices that never enrolled or
connected, a scenario's broken promise), and the rich tables for the terminal.
`build_report` is pure; `environment()` and `process_usage()` read the machine.
Must not: run anything or render HTML (`simulator.html`).
"""

from __future__ import annotations

import asyncio
import os
import platform
import resource
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from simulator.ledger import DeliveryVerdict
from simulator.metrics import LATENCY_KINDS, Metrics
from simulator.scenario import RunOptions, ScenarioOutcome
from simulator.stats import summarize

__all__ = ["DeviceCounts", "build_report", "environment", "print_report", "process_usage"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceCounts:
    requested: int
    enrolled: int
    connected: int


def build_report(
    *,
    options: RunOptions,
    scenario: str,
    summary: str,
    devices: DeviceCounts,
    verdict: DeliveryVerdict,
    metrics: Metrics,
    outcome: ScenarioOutcome,
    env: Mapping[str, Any],
    resources: Mapping[str, Any],
) -> dict[str, Any]:
    kinds = [*LATENCY_KINDS, *sorted(k for k in metrics.latencies if k not in LATENCY_KINDS)]
    attacks = metrics.attacks
    report: dict[str, Any] = {
        "scenario": {"name": scenario, "summary": summary, **outcome.extra},
        "options": {
            "devices": options.devices,
            "duration_s": options.duration,
            "interval_s": options.interval,
            "token_lifetime_s": options.token_lifetime,
            "gateway": "external" if options.gateway_dir else "embedded",
        },
        "devices": {
            "requested": devices.requested,
            "enrolled": devices.enrolled,
            "connected": devices.connected,
        },
        "messages": verdict.as_dict(),
        "latency_ms": {k: summarize(metrics.latencies.get(k, [])).as_dict() for k in kinds},
        "errors": dict(sorted(metrics.errors.items())),
        "mqtt_tls": {
            "handshakes": metrics.mqtt_tls["handshakes"],
            "resumed": metrics.mqtt_tls["resumed"],
        },
        "attacks": {
            "attempted": sum(attacks.attempted.values()),
            "refused": sum(attacks.refused.values()),
            "by_kind": {
                k: {"attempted": n, "refused": attacks.refused.get(k, 0)}
                for k, n in sorted(attacks.attempted.items())
            },
        },
        "throughput": metrics.timeline.series(),
        "phases_s": dict(metrics.phases),
        "gaps": verdict.gaps,
        "environment": dict(env),
        "resources": dict(resources),
    }
    failures = run_failures(devices, verdict, attacks.let_through, outcome)
    report["failures"] = failures
    report["ok"] = not failures
    return report


def run_failures(
    devices: DeviceCounts, verdict: DeliveryVerdict, let_through: int, outcome: ScenarioOutcome
) -> list[str]:
    failures: list[str] = []
    if verdict.lost:
        failures.append(
            f"{verdict.lost} messages lost ({verdict.lost_after_ack} of them acknowledged "
            f"by the gateway, {verdict.unacked} never acknowledged)"
        )
    if let_through:
        failures.append(f"{let_through} attacks were not refused")
    if devices.enrolled < devices.requested:
        failures.append(f"only {devices.enrolled} of {devices.requested} devices enrolled")
    if devices.connected < devices.enrolled:
        failures.append(f"only {devices.connected} of {devices.enrolled} devices connected")
    failures.extend(outcome.failures)
    return failures


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "event_loop": type(asyncio.get_event_loop_policy()).__module__.split(".")[0],
    }


def process_usage(gateway_pid: int | None) -> dict[str, Any]:
    """CPU seconds and peak memory of this process and of the (embedded) gateway."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    usage: dict[str, Any] = {
        "simulator": {
            "cpu_s": round(own.ru_utime + own.ru_stime, 2),
            "max_rss_mb": round(own.ru_maxrss / 1024, 1),
        }
    }
    if gateway_pid is not None:
        usage["gateway"] = _proc_usage(gateway_pid)
    return usage


def _proc_usage(pid: int) -> dict[str, Any] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    hwm = status.get("VmHWM", "0 kB").split()[0]
    return {"pid": pid, "cpu_s": round(cpu, 2), "max_rss_mb": round(int(hwm) / 1024, 1)}


# -- terminal -----------------------------------------------------------------------------


def print_report(console: Console, report: Mapping[str, Any]) -> None:
    console.print(_counts_table(report))
    console.print(_latency_table(report))
    errors = report["errors"]
    if errors:
        console.print("errors: " + ", ".join(f"{k} {v}" for k, v in errors.items()))
    attacks = report["attacks"]
    if attacks["attempted"]:
        console.print(f"attacks: {attacks['refused']} of {attacks['attempted']} refused")
    scenario = {k: v for k, v in report["scenario"].items() if k not in ("name", "summary")}
    if scenario:
        console.print(f"scenario {report['scenario']['name']}: {scenario}", highlight=False)
    for failure in report["failures"]:
        console.print(f"[bold red]FAIL[/] {failure}")
    if report["ok"]:
        console.print("[bold green]OK[/] nothing lost, every attack refused")


def _counts_table(report: Mapping[str, Any]) -> Table:
    table = Table(title=f"gatepass-sim: {report['scenario']['name']}")
    d, m = report["devices"], report["messages"]
    for name in (
        "devices",
        "enrolled",
        "connected",
        "sent",
        "acked",
        "delivered",
        "lost",
        "duplicates",
        "reordered",
    ):
        table.add_column(name, justify="right")
    table.add_row(
        str(d["requested"]),
        str(d["enrolled"]),
        str(d["connected"]),
        str(m["sent"]),
        str(m["acked"]),
        str(m["delivered"]),
        str(m["lost"]),
        str(m["duplicates"]),
        str(m["reordered"]),
    )
    return table


def _latency_table(report: Mapping[str, Any]) -> Table:
    table = Table(title="latency (ms)")
    for name in ("", "count", "p50", "p95", "p99", "max"):
        table.add_column(name, justify="right" if name else "left")
    for kind, s in report["latency_ms"].items():
        table.add_row(kind, str(s["count"]), *(_ms(s[k]) for k in ("p50", "p95", "p99", "max")))
    return table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
