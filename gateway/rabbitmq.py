"""The RabbitMQ broker profile: a device's ACL as RabbitMQ OAuth 2 scopes, and the broker config.

Owns: translating an expanded ACL (`tuple[AclRule, ...]`) into the `scope` claim that
RabbitMQ 3.10's `rabbitmq_auth_backend_oauth2` reads (`translate_acl`, `scope_claim`),
refusing ACLs it cannot express (`check_acl`, for `device add`), a model of how RabbitMQ
matches those scopes (`scope_permits`, used by the tests to prove the translation never
grants more than the ACL), the `rabbitmq.conf` lines of the profile (`render_conf`) and
writing the public signing keys as PEM files (`write_key_files`, the only I/O here).
Must not: read clocks, settings files or the registry, or talk to RabbitMQ.

How RabbitMQ 3.10 authorizes MQTT (measured, and read from its code):

* MQTT topics become routing keys on `amq.topic`: "/" becomes ".", "+" becomes "*",
  "#" stays; a "." in an MQTT topic is kept, so `a/b.c` and `a/b/c` are one key.
* A scope is `<rsid>.<perm>:<vhost>/<name>[/<routing key>]`; each pattern is split on
  "*" (matches any substring, dots included) and the pieces are URL-decoded ("%2A" is
  a literal "*", "+" is a space). PUBLISH needs `write` on the routing key;
  SUBSCRIBE needs `read` on the binding key (the filter, translated) and
  configure/write/read on the queue `mqtt-subscription-<client id>qos<0|1>`.
* RabbitMQ has no deny, no single-level wildcard for names, and no MQTT `$` rule.

So the translation grants, per allow rule, only what it can express exactly:

    filter                 publish (write)                  subscribe (read)
    a/b                    a.b                              a.b
    a/b/#                  a.b and a.b.*                    a.b and a.b.*
    a/+/c, a/+/#           refused                          only the literal a.%2A.c (a.%2A,
                                                            a.%2A.*): narrower
    #, +/...               refused ($ topics)               refused ($ topics)
    contains "." or "*"    refused                          refused
    overlapped by an       refused                          refused
    earlier deny

`translate_acl(strict=False)` (token minting) drops what it cannot express instead of
raising; `check_acl` (device registration) raises `UnrepresentableAcl`.

Errors (a branch of the gateway tree in `gateway.errors`):

    ConfigError
    +-- UnrepresentableAcl   a device's ACL cannot be granted exactly through RabbitMQ scopes
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal
from urllib.parse import quote

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import GatewaySettings
from gateway.errors import ConfigError
from shared.acl import AclRule, Action
from shared.pki import write_file_atomic
from shared.topics import filters_intersect

__all__ = [
    "DEFAULT_VHOST",
    "PLUGINS",
    "RESOURCE_SERVER_ID_PATTERN",
    "Grant",
    "Permission",
    "UnrepresentableAcl",
    "check_acl",
    "mqtt_to_amqp",
    "public_key_pem",
    "render_conf",
    "render_enabled_plugins",
    "scope_claim",
    "scope_permits",
    "subscription_queues",
    "token_claims",
    "translate_acl",
    "wildcard_match",
    "write_key_files",
]

Permission = Literal["configure", "write", "read"]

DEFAULT_VHOST: Final = "/"
TOPIC_EXCHANGE: Final = "amq.topic"
PLUGINS: Final = ("rabbitmq_mqtt", "rabbitmq_auth_backend_oauth2", "rabbitmq_management")
RESOURCE_SERVER_ID_PATTERN: Final = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}"
_RSID: Final = re.compile(RESOURCE_SERVER_ID_PATTERN)
_QUEUE_PREFIX: Final = "mqtt-subscription-"
_QOS_LEVELS: Final = (0, 1)  # RabbitMQ 3.10 downgrades QoS 2 subscriptions to 1
_FORBIDDEN_CHARS: Final = (".", "*")
_WILDCARD: Final = "*"
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_ACTION_PERMISSION: Final[Mapping[Action, Permission]] = {"publish": "write", "subscribe": "read"}


class UnrepresentableAcl(ConfigError):
    """The ACL has a rule that RabbitMQ scopes cannot grant without granting more."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """What a device gets on RabbitMQ: scopes (without prefix) and what was left out.

    `dropped` lists (rule, why) for allow rules granted not at all, `narrowed` those
    granted only in part (a subscribe filter with "+" is granted as that exact filter).
    """

    scopes: tuple[str, ...]
    dropped: tuple[tuple[AclRule, str], ...] = ()
    narrowed: tuple[tuple[AclRule, str], ...] = ()


# --- topics and patterns -----------------------------------------------------------------


def mqtt_to_amqp(topic: str) -> str:
    """RabbitMQ 3.10's default MQTT -> AMQP topic translation ("/" -> ".", "+" -> "*")."""
    return topic.replace("/", ".").replace("+", "*")


def _literal(text: str) -> str:
    """A pattern piece matching exactly `text` (URL-encoded: "*" is %2A, "+" is %2B)."""
    return quote(text, safe="")


def _why_unrepresentable(topic: str) -> str | None:
    levels = topic.split("/")
    if levels[0] in ("+", "#"):
        return "a filter starting with a wildcard would also grant '$' topics on RabbitMQ"
    if any(char in topic for char in _FORBIDDEN_CHARS):
        return "'.' and '*' are level separators and wildcards in RabbitMQ routing keys"
    return None


def _patterns(topic: str, action: Action) -> tuple[tuple[str, ...], str | None]:
    """Routing-key patterns granting at most `topic` for `action`, and a narrowing note.

    Raises UnrepresentableAcl with the reason when nothing exact can be granted.
    """
    why = _why_unrepresentable(topic)
    if why is not None:
        raise UnrepresentableAcl(why)
    levels = topic.split("/")
    multi = levels[-1] == "#"
    base = levels[:-1] if multi else levels
    if "+" in base and action == "publish":
        raise UnrepresentableAcl(
            "RabbitMQ's '*' also matches across levels, so '+' cannot be granted for publishing"
        )
    exact = ".".join("%2A" if level == "+" else _literal(level) for level in base)
    patterns = (exact, f"{exact}.{_WILDCARD}") if multi else (exact,)
    note = "granted only as this exact filter: RabbitMQ cannot express '+'" if "+" in base else None
    return patterns, note


def subscription_queues(client_id: str) -> tuple[str, ...]:
    """The queues RabbitMQ 3.10's MQTT plugin declares for a client's subscriptions."""
    return tuple(f"{_QUEUE_PREFIX}{client_id}qos{qos}" for qos in _QOS_LEVELS)


# --- translation -------------------------------------------------------------------------


def _applies(rule: AclRule, action: Action) -> bool:
    return rule.action == action or rule.action == "all"


def _overlapping_deny(rules: Sequence[AclRule], index: int, action: Action) -> AclRule | None:
    topic = rules[index].topic
    for earlier in rules[:index]:
        if (
            earlier.permission == "deny"
            and _applies(earlier, action)
            and filters_intersect(earlier.topic, topic)
        ):
            return earlier
    return None


def _topic_scopes(
    rules: Sequence[AclRule], action: Action, vhost: str
) -> tuple[list[str], list[tuple[AclRule, str]], list[tuple[AclRule, str]]]:
    scopes: list[str] = []
    dropped: list[tuple[AclRule, str]] = []
    narrowed: list[tuple[AclRule, str]] = []
    permission = _ACTION_PERMISSION[action]
    for index, rule in enumerate(rules):
        if rule.permission != "allow" or not _applies(rule, action):
            continue
        deny = _overlapping_deny(rules, index, action)
        if deny is not None:
            dropped.append((rule, f"{action}: overlaps the earlier deny {deny.topic!r}"))
            continue
        try:
            patterns, note = _patterns(rule.topic, action)
        except UnrepresentableAcl as exc:
            dropped.append((rule, f"{action}: {exc}"))
            continue
        if note is not None:
            narrowed.append((rule, f"{action}: {note}"))
        prefix = f"{permission}:{_literal(vhost)}/{TOPIC_EXCHANGE}/"
        scopes.extend(prefix + pattern for pattern in patterns if prefix + pattern not in scopes)
    return scopes, dropped, narrowed


def _queue_scopes(client_id: str, vhost: str) -> list[str]:
    return [
        f"{permission}:{_literal(vhost)}/{_literal(queue)}"
        for queue in subscription_queues(client_id)
        for permission in ("configure", "write", "read")
    ]


def translate_acl(
    rules: Iterable[AclRule], device_id: str, *, vhost: str = DEFAULT_VHOST, strict: bool = True
) -> Grant:
    """RabbitMQ scopes (without the resource-server prefix) for an expanded ACL.

    Every topic the scopes allow is allowed by `rules` (first match wins, no match
    denies). `strict` raises UnrepresentableAcl naming every rule that cannot be
    granted; otherwise those rules are left out and listed in `Grant.dropped`.
    """
    rules = tuple(rules)
    if any(char in device_id for char in _FORBIDDEN_CHARS):
        raise UnrepresentableAcl(
            f"device id {device_id!r}: '.' and '*' are not allowed with the RabbitMQ profile "
            "(RabbitMQ maps '.' in a topic to a level separator)"
        )
    write, dropped_w, narrowed_w = _topic_scopes(rules, "publish", vhost)
    read, dropped_r, narrowed_r = _topic_scopes(rules, "subscribe", vhost)
    dropped = (*dropped_w, *dropped_r)
    if strict and dropped:
        raise UnrepresentableAcl(_describe(device_id, dropped))
    queues = _queue_scopes(device_id, vhost) if read else []
    return Grant(
        scopes=(*write, *read, *queues), dropped=dropped, narrowed=(*narrowed_w, *narrowed_r)
    )


def _describe(device_id: str, dropped: Sequence[tuple[AclRule, str]]) -> str:
    lines = [f"  {rule.permission} {rule.action} {rule.topic!r}: {why}" for rule, why in dropped]
    return (
        f"the ACL of {device_id!r} cannot be granted exactly by RabbitMQ scopes "
        "(rabbitmq profile is on):\n" + "\n".join(lines)
    )


def check_acl(rules: Iterable[AclRule], device_id: str, *, vhost: str = DEFAULT_VHOST) -> Grant:
    """For `device add` with the profile on: the grant, or UnrepresentableAcl saying why."""
    return translate_acl(rules, device_id, vhost=vhost, strict=True)


def scope_claim(grant: Grant, resource_server_id: str) -> str:
    """The `scope` claim value: the grant's scopes prefixed with `<rsid>.`, space-separated."""
    if not _RSID.fullmatch(resource_server_id):
        raise ConfigError(f"invalid RabbitMQ resource server id {resource_server_id!r}")
    return " ".join(f"{resource_server_id}.{scope}" for scope in grant.scopes)


def token_claims(
    settings: GatewaySettings, device_id: str, acl: Sequence[AclRule]
) -> tuple[str | tuple[str, ...], str | None]:
    """`aud` and `scope` for a device token: with the profile off, (audience, None).

    With it on, `aud` also names the resource server and `scope` grants what RabbitMQ
    can express of the (expanded) ACL; rules it cannot express are left out (narrower;
    `device add` refuses such ACLs up front, so this only bites older registrations).
    """
    if not settings.rabbitmq:
        return settings.audience, None
    rsid = settings.rabbitmq_resource_server_id
    grant = translate_acl(acl, device_id, vhost=settings.rabbitmq_vhost, strict=False)
    audience = (settings.audience,) if rsid == settings.audience else (settings.audience, rsid)
    return audience, scope_claim(grant, rsid)


# --- a model of RabbitMQ's matching (rabbit_oauth2_scope and wildcard, 3.10) --------------


def _urldecode(piece: str) -> bytes | None:
    """cowlib's `cow_qs:urldecode`: %XX decoded, "+" is a space; None if malformed."""
    out = bytearray()
    data = piece.encode("utf-8")
    index = 0
    while index < len(data):
        byte = data[index]
        if byte == ord("%"):
            hex_digits = data[index + 1 : index + 3]
            if len(hex_digits) != 2 or not all(chr(b) in _HEX for b in hex_digits):
                return None
            out.append(int(hex_digits, 16))
            index += 3
            continue
        out.append(ord(" ") if byte == ord("+") else byte)
        index += 1
    return bytes(out)


def wildcard_match(subject: str, pattern: str) -> bool:
    """RabbitMQ's `wildcard:match/2`: "*" spans anything; each next piece is found greedily.

    A malformed percent-escape makes the pattern match nothing (as in 3.10).
    """
    pieces = [_urldecode(piece) for piece in pattern.split(_WILDCARD)]
    if any(piece is None for piece in pieces):
        return False
    parts: list[bytes] = [piece for piece in pieces if piece is not None]
    text = subject.encode("utf-8")
    first, rest = parts[0], parts[1:]
    if not text.startswith(first):
        return False
    return _scan(text, rest, len(first))


def _scan(text: bytes, rest: list[bytes], pos: int) -> bool:
    length = len(text)
    while True:
        if rest == [b""]:
            return True
        if not rest:
            return pos == length
        if pos == length:
            return False
        part, rest = rest[0], rest[1:]
        if not part:
            continue
        found = text.find(part, pos)
        if found < 0:
            return False
        pos = found + len(part)


def _parsed(scopes: Iterable[str], resource_server_id: str) -> list[tuple[str, list[str]]]:
    prefix = f"{resource_server_id}."
    parsed: list[tuple[str, list[str]]] = []
    for scope in scopes:
        if not scope.startswith(prefix):
            continue
        permission, colon, resource = scope[len(prefix) :].partition(":")
        if colon:
            parsed.append((permission, resource.split("/")))
    return parsed


def scope_permits(
    claim: str,
    resource_server_id: str,
    permission: Permission,
    kind: Literal["exchange", "queue", "topic"],
    name: str,
    *,
    vhost: str = DEFAULT_VHOST,
    routing_key: str = "",
) -> bool:
    """Whether RabbitMQ would allow `permission` on a resource (or topic) by `claim`.

    `kind="topic"` is the topic check on exchange `name` with `routing_key`; the others
    are resource checks. A model for tests and diagnostics, not an enforcement point.
    """
    for scope_permission, parts in _parsed(claim.split(" "), resource_server_id):
        if scope_permission != permission or len(parts) not in (2, 3):
            continue
        if not (wildcard_match(vhost, parts[0]) and wildcard_match(name, parts[1])):
            continue
        if kind != "topic" or (len(parts) == 3 and wildcard_match(routing_key, parts[2])):
            return True
    return False


# --- rabbitmq.conf -------------------------------------------------------------------------


def render_enabled_plugins() -> str:
    """The `enabled_plugins` file the profile needs."""
    return f"[{','.join(PLUGINS)}].\n"


def render_conf(
    *,
    resource_server_id: str,
    key_files: Mapping[str, Path],
    mqtt_port: int,
    management_port: int,
    vhost: str = DEFAULT_VHOST,
    collect_statistics_ms: int = 500,
) -> str:
    """The `rabbitmq.conf` lines of the profile (RabbitMQ 3.10 new-style config)."""
    if not _RSID.fullmatch(resource_server_id):
        raise ConfigError(f"invalid RabbitMQ resource server id {resource_server_id!r}")
    if not key_files:
        raise ConfigError("no signing key to configure")
    keys = [f"auth_oauth2.signing_keys.{kid} = {path}" for kid, path in sorted(key_files.items())]
    return "\n".join(
        [
            "## Gatepass RabbitMQ profile (generated by 'gatepass-gateway rabbitmq config').",
            "## Devices authenticate with their Gatepass access token as the MQTT password;",
            "## the management user for the Gatepass enforcer is an internal user.",
            "auth_backends.1 = rabbit_auth_backend_oauth2",
            "auth_backends.2 = rabbit_auth_backend_internal",
            f"auth_oauth2.resource_server_id = {resource_server_id}",
            "auth_oauth2.algorithms.1 = ES256",
            *keys,
            f"mqtt.listeners.tcp.default = {mqtt_port}",
            "mqtt.allow_anonymous = false",
            f"mqtt.vhost = {vhost}",
            f"mqtt.exchange = {TOPIC_EXCHANGE}",
            "## TLS for MQTT (recommended; the CA makes RabbitMQ demand a Gatepass device cert):",
            "# mqtt.listeners.ssl.default = 8883",
            "# ssl_options.cacertfile = /path/to/gateway/pki/ca.pem",
            "# ssl_options.certfile = /path/to/broker.pem",
            "# ssl_options.keyfile = /path/to/broker.key",
            "# ssl_options.verify = verify_peer",
            "# ssl_options.fail_if_no_peer_cert = true",
            f"management.tcp.port = {management_port}",
            "## The enforcer sees a new connection in the management API after at most",
            "## the smallest 'basic' sample interval (default 5 s; the profile needs 1 s).",
            f"collect_statistics_interval = {collect_statistics_ms}",
            "management.sample_retention_policies.global.minute = 5",
            "management.sample_retention_policies.global.hour = 60",
            "management.sample_retention_policies.global.day = 1200",
            "management.sample_retention_policies.basic.minute = 1",
            "management.sample_retention_policies.basic.hour = 60",
            "management.sample_retention_policies.detailed.10 = 5",
            "",
        ]
    )


def public_key_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM, the form `auth_oauth2.signing_keys` reads."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_key_files(
    out_dir: Path, public_keys: Mapping[str, ec.EllipticCurvePublicKey]
) -> dict[str, Path]:
    """Write `<kid>.pem` (public keys, mode 0644) into `out_dir`; returns kid -> path.

    Files of keys no longer listed are left alone (a retired key's file is harmless:
    RabbitMQ only trusts the keys named in its config).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for kid, public_key in sorted(public_keys.items()):
        path = (out_dir / f"{kid}.pem").resolve()
        write_file_atomic(path, public_key_pem(public_key), mode=0o644)
        paths[kid] = path
    return paths
