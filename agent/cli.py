"""`gatepass-agent`: enroll, token, run, status.

Owns: argument parsing, settings from flags, `DIR/agent.toml` and `GATEPASS_AGENT_*`
environment variables (in that order of precedence), and one clear line on stderr
with a non-zero exit for every expected failure, never a traceback.
Must not: hold device logic (see `agent.enrollment`, `agent.device`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.enrollment import enroll
from agent.errors import StateError
from agent.gateway_client import GatewayClient
from agent.identity import StateLayout, load_identity
from shared.commandline import fail, run_command

__all__ = ["main"]

PROG = "gatepass-agent"
ENV_PREFIX = "GATEPASS_AGENT_"


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, _parser().parse_args(argv), database="outbox")


def _fail(message: str) -> int:
    return fail(PROG, message)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Gatepass device agent")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("enroll", help="enroll once with a one-time secret")
    p.add_argument("--gateway", required=True, help="https://HOST:PORT of the gateway")
    p.add_argument("--ca", type=Path, required=True, help="the gateway's CA certificate (PEM)")
    p.add_argument("--device-id", required=True)
    p.add_argument("--secret", default=None, help="one-time secret (or env GATEPASS_AGENT_SECRET)")
    p.add_argument("--mqtt", default=None, help="mqtts://HOST:PORT (default: from the gateway)")
    _state(p)
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("token", help="print a fresh access token")
    _state(p)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("run", help="publish telemetry, renew, store and forward")
    _state(p)
    p.add_argument("--mqtt", default=None, help="mqtts://HOST:PORT or mqtt://HOST:PORT")
    p.add_argument("--interval", type=_positive, default=None, help="seconds between readings")
    p.add_argument("--count", type=int, default=None, help="stop after reading N")
    p.add_argument("--command", default=None, help="program run for each command (stdin)")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="certificate, token, outbox")
    _state(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    return parser


def _state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", type=Path, required=True, help="agent state directory")


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return number


def settings(state: Path, flags: dict[str, Any]) -> dict[str, Any]:
    """Flags win over the environment, which wins over `DIR/agent.toml`."""
    merged: dict[str, Any] = {}
    toml_path = StateLayout(state).root / "agent.toml"
    if toml_path.exists():
        try:
            merged.update(tomllib.loads(toml_path.read_text()))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise StateError(f"{toml_path}: not valid TOML: {exc}") from exc
    for key, value in os.environ.items():
        if key.startswith(ENV_PREFIX):
            merged[key[len(ENV_PREFIX) :].lower()] = value
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


# --- commands --------------------------------------------------------------------------


def cmd_enroll(args: argparse.Namespace) -> int:
    secret = args.secret or os.environ.get(f"{ENV_PREFIX}SECRET")
    if not secret:
        return _fail("an enrollment secret is required (--secret or GATEPASS_AGENT_SECRET)")
    result = enroll(args.state, args.gateway, args.ca, args.device_id, secret, args.mqtt)
    identity = result.identity
    if result.already_enrolled:
        print(
            f"already enrolled as {identity.device_id}; certificate valid until "
            f"{_iso(identity.not_after)}"
        )
        return 0
    if result.clock_offset is not None and abs(result.clock_offset) > 60:
        print(
            f"warning: this device's clock differs from the gateway's by "
            f"{result.clock_offset:+.0f} s; set it (NTP)",
            file=sys.stderr,
        )
    print(f"enrolled {identity.device_id}; certificate valid until {_iso(identity.not_after)}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    identity = load_identity(args.state)
    client = GatewayClient(identity.gateway_url, identity.tls_context())
    try:
        grant = client.token(identity.device_id)
    finally:
        client.close()
    print(grant.access_token)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from agent.device import DeviceOptions, run_device

    conf = settings(
        args.state,
        {
            "mqtt": args.mqtt,
            "interval": args.interval,
            "count": args.count,
            "command": args.command,
        },
    )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    identity = load_identity(args.state)
    try:
        options = DeviceOptions(
            mqtt_url=conf.get("mqtt") or identity.mqtt_url,
            interval=float(conf.get("interval", 10.0)),
            count=int(conf["count"]) if conf.get("count") is not None else None,
            command=conf.get("command"),
            outbox_max_messages=int(conf.get("outbox_max_messages", 100_000)),
            outbox_max_bytes=int(conf.get("outbox_max_bytes", 64 * 1024 * 1024)),
        )
    except (TypeError, ValueError) as exc:
        return _fail(f"bad setting: {exc}")
    return asyncio.run(run_device(identity, options))


def cmd_status(args: argparse.Namespace) -> int:
    identity = load_identity(args.state)
    layout = identity.layout
    status: dict[str, Any] = {}
    if layout.status.exists():
        try:
            status = json.loads(layout.status.read_text())
        except ValueError:
            status = {}
    from agent.outbox import Outbox

    depth = dropped = None
    if layout.outbox.exists():
        with Outbox.open(layout.outbox) as outbox:
            depth, dropped = outbox.depth(), outbox.dropped
    data = {
        "device_id": identity.device_id,
        "gateway": identity.gateway_url,
        "certificate_not_after": _iso(identity.not_after),
        "certificate_expires_in_s": round(identity.not_after - time.time()),
        "token_expires_at": _iso(status.get("token_expires_at")),
        "outbox_depth": depth,
        "outbox_dropped": dropped,
        "last_error": status.get("last_error"),
        "last_seq": status.get("last_seq"),
        "connects": status.get("connects"),
        "token_refreshes": status.get("token_refreshes"),
        "cert_renewals": status.get("cert_renewals"),
    }
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            print(f"{key}: {value}")
    return 0
