"""`gatepass-sim`: run a virtual fleet against a gateway and report what happened.

Owns: the command line (`gatepass-sim run ...`), checking arguments (a bad one is one
line on stderr and exit 2), writing `--json` and `--html`, printing the report, and
the exit code: 0 when nothing was lost and every attack was refused, 1 otherwise, 2 for
bad arguments or a gateway that cannot be started or found.
Must not: measure or decide anything itself (`simulator.run` and `simulator.report`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console

from gateway.eventloop import install_event_loop_policy
from shared.errors import GatepassError
from simulator.console import PhaseProgress
from simulator.gateway_process import GatewayError
from simulator.html import render_html
from simulator.report import print_report
from simulator.run import run_simulation
from simulator.scenario import RunOptions
from simulator.scenarios import scenario_names

__all__ = ["main"]

PROG = "gatepass-sim"
MAX_DEVICES = 100_000


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        options = _options(args)
    except ValueError as exc:
        return _fail(str(exc), 2)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    # SIGTERM unwinds like Ctrl-C, so the embedded gateway is stopped, never orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    install_event_loop_policy()  # thousands of agents in one loop: uvloop's is cheaper
    try:
        result = asyncio.run(run_simulation(options, PhaseProgress(console)))
    except (GatewayError, GatepassError) as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130
    report = result.report
    print_report(console, report)
    try:
        _write_outputs(options, report, result.samples)
    except OSError as exc:
        return _fail(f"{exc.filename}: {exc.strerror}", 2)
    return 0 if report["ok"] else 1


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, exit 2 (argparse's default prints the whole usage first)."""
        self.exit(2, f"{PROG}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Simulate a fleet of Gatepass devices")
    sub = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("run", help="enroll, connect and run a virtual fleet, then report")
    p.add_argument(
        "--gateway-dir",
        type=Path,
        default=None,
        help="use the gateway already running from this state directory",
    )
    p.add_argument("--devices", type=int, default=20, help="virtual devices (default 20)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of steady publishing")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between readings")
    p.add_argument(
        "--token-lifetime",
        type=int,
        default=None,
        help="access-token lifetime in seconds (embedded gateway only)",
    )
    p.add_argument("--scenario", default="steady", help=f"one of {', '.join(scenario_names())}")
    p.add_argument("--json", type=Path, default=None, dest="json_path", metavar="FILE")
    p.add_argument("--html", type=Path, default=None, dest="html_path", metavar="FILE")
    p.add_argument("--enroll-concurrency", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--connect-concurrency", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--drain-timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    p.add_argument("--delivery-timeout", type=float, default=15.0, help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help="keep the run's temporary directory")
    p.add_argument("--seed", type=int, default=None, help="seed the schedule's randomness")
    return parser


def _options(args: argparse.Namespace) -> RunOptions:
    if not 1 <= args.devices <= MAX_DEVICES:
        raise ValueError(f"--devices must be between 1 and {MAX_DEVICES}")
    if not args.duration > 0:
        raise ValueError("--duration must be positive")
    if not args.interval > 0:
        raise ValueError("--interval must be positive")
    if args.token_lifetime is not None:
        if not 5 <= args.token_lifetime <= 3600:
            raise ValueError("--token-lifetime must be between 5 and 3600 seconds")
        if args.gateway_dir is not None:
            raise ValueError("--token-lifetime needs the embedded gateway (drop --gateway-dir)")
    if args.scenario not in scenario_names():
        raise ValueError(
            f"unknown scenario {args.scenario!r} (choose from {', '.join(scenario_names())})"
        )
    for name in ("enroll_concurrency", "connect_concurrency"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    return RunOptions(
        devices=args.devices,
        duration=args.duration,
        interval=args.interval,
        token_lifetime=args.token_lifetime,
        scenario=args.scenario,
        gateway_dir=args.gateway_dir,
        json_path=args.json_path,
        html_path=args.html_path,
        enroll_concurrency=args.enroll_concurrency,
        connect_concurrency=args.connect_concurrency,
        drain_timeout=args.drain_timeout,
        delivery_timeout=args.delivery_timeout,
        keep=args.keep,
        seed=args.seed,
    )


def _write_outputs(
    options: RunOptions, report: dict[str, object], samples: Mapping[str, list[float]]
) -> None:
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(report, indent=2) + "\n")
    if options.html_path is not None:
        options.html_path.write_text(render_html(report, samples))
