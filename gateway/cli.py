"""`gatepass-gateway`: init, serve, and the administration commands.

Owns: argument parsing, rendering results for people (`--json` for programs), and
turning every expected failure into one line on stderr with a non-zero exit, never a
traceback. Must not: hold logic the running gateway also needs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.config import GatewaySettings, load_settings
from gateway.enrollment_secrets import hash_secret, new_secret
from gateway.errors import RegistryError
from gateway.init import initialize
from gateway.keyring import retire_key_now, rotate_keys
from gateway.registry import DeviceRecord, Registry, validate_device_id
from gateway.signing_keys import active_kids
from gateway.statedir import StateDir
from shared.acl import AclRule, expand_placeholders, rules_from_cli
from shared.commandline import fail, run_command

__all__ = ["main"]

PROG = "gatepass-gateway"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, _parser().parse_args(kid_as_operand(args)), database="registry")


_RETIRE_FLAGS = frozenset({"--now", "--json", "-h", "--help"})


def kid_as_operand(argv: list[str]) -> list[str]:
    """Move a KID that starts with '-' behind '--' in `keys retire`, so argparse takes it.

    A kid is a base64url thumbprint: one in 64 starts with '-', and people paste it as
    `keys list` printed it. Anything else after `retire` that looks like an option and is
    not one of its flags is that KID.
    """
    if argv[:2] != ["keys", "retire"] or "--" in argv:
        return argv
    kept: list[str] = []
    kids: list[str] = []
    rest = iter(argv[2:])
    for arg in rest:
        if arg == "--dir":
            kept.append(arg)
            value = next(rest, None)
            if value is not None:
                kept.append(value)
        elif arg.startswith("-") and arg not in _RETIRE_FLAGS and not arg.startswith("--dir="):
            kids.append(arg)
        else:
            kept.append(arg)
    return [*argv[:2], *kept, *(["--", *kids] if kids else [])]


def _fail(message: str) -> int:
    return fail(PROG, message)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Gatepass edge gateway")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a gateway state directory")
    _dir(p)
    p.add_argument("--host", action="append", default=[], help="extra name or address (SAN)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="run the HTTPS and MQTT listeners")
    _dir(p)
    p.add_argument("--https-port", type=_port, default=None)
    p.add_argument("--mqtt-port", type=_port, default=None)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=cmd_serve)

    device = sub.add_parser("device", help="register, list, show, revoke devices")
    dsub = device.add_subparsers(required=True, metavar="ACTION")
    p = dsub.add_parser("add", help="register a device and print its enrollment secret")
    _dir(p)
    p.add_argument("device_id", metavar="ID")
    p.add_argument("--pub", action="append", default=[], metavar="FILTER")
    p.add_argument("--sub", action="append", default=[], metavar="FILTER")
    p.add_argument("--deny", action="append", default=[], metavar="FILTER")
    _json(p)
    p.set_defaults(func=cmd_device_add)
    p = dsub.add_parser("list")
    _dir(p)
    _json(p)
    p.set_defaults(func=cmd_device_list)
    for name, func in (("show", cmd_device_show), ("revoke", cmd_device_revoke)):
        p = dsub.add_parser(name)
        _dir(p)
        p.add_argument("device_id", metavar="ID")
        _json(p)
        p.set_defaults(func=func)

    keys = sub.add_parser("keys", help="token signing keys")
    ksub = keys.add_subparsers(required=True, metavar="ACTION")
    p = ksub.add_parser("list")
    _dir(p)
    _json(p)
    p.set_defaults(func=cmd_keys_list)
    p = ksub.add_parser("rotate", help="make a new key current")
    _dir(p)
    _json(p)
    p.set_defaults(func=cmd_keys_rotate)
    p = ksub.add_parser("retire", help="end a compromised key and every token it signed")
    _dir(p)
    p.add_argument("kid", metavar="KID")
    p.add_argument("--now", action="store_true", required=True, help="required: retire at once")
    _json(p)
    p.set_defaults(func=cmd_keys_retire)
    _rabbitmq_parser(sub)
    return parser


def _dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, required=True, help="gateway state directory")


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _open(root: Path) -> tuple[StateDir, Registry]:
    state = StateDir(root)
    state.require_initialized()
    return state, Registry.open(state.database)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


# --- commands --------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    state = initialize(args.dir, args.host)
    print(f"initialized {state.root} (CA {state.ca_cert})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.eventloop import install_event_loop_policy
    from gateway.server import serve  # the gateway's heavy imports only where needed

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    loop = install_event_loop_policy()
    logging.getLogger("gatepass.server").info("event loop: %s", loop)
    asyncio.run(serve(args.dir, args.https_port, args.mqtt_port))
    return 0


def cmd_device_add(args: argparse.Namespace) -> int:
    validate_device_id(args.device_id)
    state, registry = _open(args.dir)
    with registry:
        settings = load_settings(state.config)
        rules = rules_from_cli(args.pub, args.sub, args.deny)
        _rabbitmq_check(settings, rules, args.device_id)
        secret = new_secret()
        now = time.time()
        expires = now + settings.enrollment_secret_ttl
        registry.add_device(args.device_id, rules, hash_secret(secret), expires, now)
        registry.audit("device_add", "ok", now, device_id=args.device_id, source="cli")
    data = {"device_id": args.device_id, "secret": secret, "expires_at": _iso(expires)}
    _emit(
        args,
        data,
        f"device {args.device_id} registered\nenrollment secret: {secret}\n"
        f"expires: {data['expires_at']}",
    )
    return 0


def _device_json(device: DeviceRecord, registry: Registry) -> dict[str, Any]:
    cert = registry.current_certificate(device.id)
    return {
        "device_id": device.id,
        "status": device.status,
        "created_at": _iso(device.created_at),
        "acl": [rule.model_dump() for rule in device.acl],
        "certificate": None
        if cert is None
        else {
            "serial": cert.serial,
            "not_after": _iso(cert.not_after),
            "revoked": cert.revoked_at is not None,
        },
    }


def cmd_device_list(args: argparse.Namespace) -> int:
    _, registry = _open(args.dir)
    with registry:
        devices = [_device_json(d, registry) for d in registry.list_devices()]
    lines = [f"{d['device_id']:<32} {d['status']:<10} {d['created_at']}" for d in devices]
    _emit(args, devices, "\n".join(lines) if lines else "no devices")
    return 0


def cmd_device_show(args: argparse.Namespace) -> int:
    _, registry = _open(args.dir)
    with registry:
        device = registry.get_device(args.device_id)
        if device is None:
            raise RegistryError(f"no device {args.device_id!r}")
        data = _device_json(device, registry)
    text = "\n".join(f"{k}: {json.dumps(v)}" for k, v in data.items())
    _emit(args, data, text)
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    _, registry = _open(args.dir)
    with registry:
        now = time.time()
        registry.revoke_device(args.device_id, now)
    _emit(
        args, {"device_id": args.device_id, "status": "revoked"}, f"device {args.device_id} revoked"
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    _, registry = _open(args.dir)
    with registry:
        records = registry.signing_keys()
    now = time.time()
    verifying = active_kids(records, now)
    data = [
        {
            "kid": r.kid,
            "state": r.state,
            "created_at": _iso(r.created_at),
            "retire_after": _iso(r.retire_after),
            "retired_at": _iso(r.retired_at),
            "verifies": r.kid in verifying,
        }
        for r in records
    ]
    lines = [f"{d['kid']}  {d['state']:<9} created {d['created_at']}" for d in data]
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    state, registry = _open(args.dir)
    with registry:
        settings = load_settings(state.config)
        kid = rotate_keys(state, registry, time.time(), settings.token_lifetime)
        registry.audit("key_rotate", "ok", time.time(), source="cli", detail=kid)
    _emit(args, {"current": kid}, f"new current key {kid}")
    return 0


def cmd_keys_retire(args: argparse.Namespace) -> int:
    state, registry = _open(args.dir)
    with registry:
        settings = load_settings(state.config)
        new = retire_key_now(state, registry, args.kid, time.time(), settings.token_lifetime)
        registry.audit("key_retire", "ok", time.time(), source="cli", detail=args.kid)
    text = f"key {args.kid} retired" + (f"; new current key {new}" if new else "")
    _emit(args, {"retired": args.kid, "current": new}, text)
    return 0


# --- RabbitMQ profile (gateway/rabbitmq.py, docs/scaling-out.md) -----------------------------


def _rabbitmq_parser(sub: Any) -> None:
    group = sub.add_parser("rabbitmq", help="the RabbitMQ scale-out profile")
    rsub = group.add_subparsers(required=True, metavar="ACTION")
    p = rsub.add_parser("config", help="print rabbitmq.conf lines and write the key files")
    _dir(p)
    p.add_argument("--out", type=Path, default=None, help="key file directory (DIR/rabbitmq)")
    p.set_defaults(func=cmd_rabbitmq_config)
    p = rsub.add_parser("enforce", help="close expired, revoked and hijacked MQTT sessions")
    _dir(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=cmd_rabbitmq_enforce)


def _rabbitmq_check(settings: GatewaySettings, rules: Sequence[AclRule], device_id: str) -> None:
    """With the profile on, refuse an ACL RabbitMQ could not enforce exactly."""
    if settings.rabbitmq:
        from gateway.rabbitmq import check_acl

        check_acl(expand_placeholders(rules, device_id), device_id, vhost=settings.rabbitmq_vhost)


def cmd_rabbitmq_config(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from gateway.keyring import KeyRing
    from gateway.rabbitmq import render_conf, render_enabled_plugins, write_key_files

    state, registry = _open(args.dir)
    with registry:
        settings = load_settings(state.config)
        ring = KeyRing.load(state, registry, time.time())
    out = (args.out or state.root / "rabbitmq").resolve()
    paths = write_key_files(out, ring.verifying)
    management_port = urlsplit(settings.rabbitmq_management_url).port or 15672
    print(
        render_conf(
            resource_server_id=settings.rabbitmq_resource_server_id,
            key_files=paths,
            mqtt_port=settings.rabbitmq_mqtt_port,
            management_port=management_port,
            vhost=settings.rabbitmq_vhost,
        ),
        end="",
    )
    print(f"## enabled_plugins: {render_enabled_plugins()}", end="")
    print("## After 'keys rotate', re-run this command, copy the key files and add the new")
    print("## key to every running node (no restart needed):")
    for kid, path in paths.items():
        # '--' first: a kid (a base64url thumbprint) may start with '-', and rabbitmqctl
        # would read it as an option.
        print(f"##   rabbitmqctl -n NODE add_uaa_key --pem-file={path} -- {kid}")
    print("## After 'keys retire KID --now', remove the key from every running node:")
    print("##   rabbitmqctl -n NODE eval 'uaa_jwt:remove_signing_key(<<\"KID\">>).'")
    if not settings.rabbitmq:
        print("## note: 'rabbitmq = true' is not set in gateway.toml: tokens carry no scope yet")
    return 0


def cmd_rabbitmq_enforce(args: argparse.Namespace) -> int:
    from gateway.rabbitmq_enforcer import run

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run(args.dir)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
