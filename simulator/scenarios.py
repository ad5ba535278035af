"""The scenarios `gatepass-sim run --scenario NAME` knows, and their registry.

Owns: each scenario's promise and how it is checked: `steady` (publish; nothing may be
lost), `storm` (halfway through, every device drops its connection at once and must
come back), `churn` (tokens so short-lived that every device refreshes and reconnects
several times; nothing may be lost), `rotation` (the signing key is rotated mid-run: no
device is wrongly disconnected, old tokens still open sessions, new tokens carry the
new kid), `revoke` (10% of the devices are revoked mid-run: their sessions end within
1 s, they cannot come back, everyone else is untouched), `attack` (a share of the
devices turn hostile: forged, expired and other devices' tokens, topic escalation, a
stolen token, a replayed enrollment secret; every attempt must be refused, and is
counted) and `chaos` (the gateway is SIGKILLed and restarted on the same ports:
nothing may be lost). A scenario is any object with the members of
`simulator.scenario.Scenario`; add one by writing a class here and an entry in
`SCENARIOS` (name -> factory).
Must not: drive honest devices beyond the agent's public API (`publish_reading`,
`request_reconnect`, `connected`, `stats`, `tokens`, `link.disconnected`), or touch
the report's fixed keys. Hostile devices use their own identities (key, certificate,
used enrollment secret) through the agent's `MqttLink` and `GatewayClient`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import re
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.device import Device, parse_mqtt_url
from agent.errors import AgentError, GatewayRefused
from agent.gateway_client import GatewayClient
from agent.identity import DeviceIdentity, trust_context
from agent.mqtt_link import (
    ConnectRefused,
    InboundMessage,
    LinkClosed,
    LinkError,
    MqttLink,
    SubscribeRefused,
)
from gateway.statedir import StateDir
from shared.errors import GatepassError
from shared.pki import build_csr, generate_p256_key
from shared.tokens import LEEWAY_SECONDS
from simulator.fleet import POLL_S, VirtualDevice, wait_until
from simulator.gateway_process import Gateway, GatewayError
from simulator.ledger import DeliveryLedger
from simulator.metrics import Metrics
from simulator.scenario import RunContext, RunOptions, Scenario, ScenarioFactory, ScenarioOutcome
from simulator.stats import summarize
from simulator.verifier import TELEMETRY_FILTER

__all__ = [
    "CHURN_TOKEN_LIFETIME_S",
    "SCENARIOS",
    "SPEC_REFUSAL",
    "make_scenario",
    "scenario_names",
    "token_kid",
]

CHURN_TOKEN_LIFETIME_S = 6
"""The gateway's minimum is 5 s; devices refresh at about two thirds of it."""
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
                "token_refreshes": _spread(refreshes),
                "reconnects": _spread(reconnects),
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


def _spread(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"min": None, "mean": None, "max": None}
    return {"min": min(values), "mean": round(statistics.fmean(values), 2), "max": max(values)}


# -- shared by the scenarios below ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Counters:
    """What one agent had counted at one instant (compared before and after an event)."""

    connects: int
    refreshes: int
    errors: Mapping[str, int]

    @classmethod
    def of(cls, agent: Device) -> _Counters:
        stats = agent.stats
        return cls(stats.connects, stats.token_refreshes, dict(stats.errors))

    def errors_since(self, before: _Counters) -> dict[str, int]:
        """Failures the agent recorded after `before` (kind -> count)."""
        return {
            kind: n - before.errors.get(kind, 0)
            for kind, n in sorted(self.errors.items())
            if n > before.errors.get(kind, 0)
        }


def _snapshot(devices: Iterable[VirtualDevice]) -> dict[str, _Counters]:
    return {vd.device_id: _Counters.of(vd.require_agent()) for vd in devices}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_json(segment: str) -> dict[str, Any]:
    data = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    if not isinstance(data, dict):
        raise ValueError("a JWT segment is not a JSON object")
    return data


def _jwt(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes) -> str:
    compact = json.dumps(dict(header), separators=(",", ":")).encode()
    body = json.dumps(dict(claims), separators=(",", ":")).encode()
    return f"{_b64url(compact)}.{_b64url(body)}.{_b64url(signature)}"


def _jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Header, claims and the signature segment of a compact JWS (not verified)."""
    header, claims, signature = token.split(".")
    return _b64url_json(header), _b64url_json(claims), signature


def token_kid(token: str | None) -> str | None:
    """The `kid` in a token's header (None for no token or an unreadable one)."""
    if token is None:
        return None
    try:
        kid = _jwt_parts(token)[0].get("kid")
    except ValueError:
        return None
    return str(kid) if kid is not None else None


def _current_kid(vd: VirtualDevice) -> str | None:
    token = vd.require_agent().tokens.current
    return token_kid(token.value if token else None)


def _https_get(gateway: Gateway, path: str) -> bytes:
    """GET `path` from the gateway, trusting only its CA (blocking)."""
    context = trust_context(gateway.ca_file.read_bytes())
    parts = urlsplit(gateway.require_endpoints().https)
    conn = http.client.HTTPSConnection(
        parts.hostname or "localhost", parts.port or 443, timeout=HTTP_TIMEOUT_S, context=context
    )
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def _fetch_jwks(gateway: Gateway) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(_https_get(gateway, "/.well-known/jwks.json"))
    return data


_REFUSAL_METRIC = re.compile(
    r"^gatepass_mqtt_(connects|subscribes_refused|publishes_refused)_total\{([^}]*)\}\s+(\S+)$",
    re.MULTILINE,
)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _refusal_counts(gateway: Gateway) -> Counter[str]:
    """The MQTT listener's refusals so far, from `/metrics`: `connect:bad_token` -> n."""
    text = _https_get(gateway, "/metrics").decode("utf-8", "replace")
    counts: Counter[str] = Counter()
    for metric, labels, value in _REFUSAL_METRIC.findall(text):
        label = dict(_LABEL.findall(labels))
        if label.get("outcome", "refused") != "refused":
            continue
        what = {"connects": "connect", "subscribes_refused": "subscribe"}.get(metric, "publish")
        counts[f"{what}:{label.get('reason', '?')}"] += round(float(value))
    return counts


def _jwks_kids(jwks: Mapping[str, Any]) -> list[str]:
    return sorted(str(k.get("kid")) for k in jwks.get("keys", []))


async def _try_connect(
    gateway: Gateway, identity: DeviceIdentity, client_id: str, token: str
) -> tuple[MqttLink | None, str]:
    """CONNECT on `identity`'s certificate as `client_id` with `token`.

    Returns the connected link (None if refused) and how it ended: `connack_N`,
    the link error's name, or `accepted`.
    """
    host, port, tls = parse_mqtt_url(gateway.require_endpoints().mqtt)
    link = MqttLink()
    try:
        await link.connect(
            host,
            port,
            client_id=client_id,
            username=client_id,
            password=token,
            tls_context=identity.tls_context() if tls else None,
            clean_session=True,
            keepalive=30,
            timeout=PROBE_TIMEOUT_S,
        )
    except ConnectRefused as exc:
        return None, f"connack_{exc.rc}"
    except LinkError as exc:
        return None, type(exc).__name__
    return link, "accepted"


def _ms_summary(seconds: Iterable[float]) -> dict[str, float | int | None]:
    return summarize([s * 1000.0 for s in seconds]).as_dict()


# -- rotation ------------------------------------------------------------------------------

ROTATION_TOKEN_LIFETIME_S = 15
"""Short enough that every device refreshes (to the new key) within a short run, long
enough that a device asked to reconnect just after the rotation still holds its old
token (the agent keeps a token with more than 5 s left)."""
ROTATION_AT_FRACTION = 0.1
ROTATION_MIN_AT_S = 1.0
ADOPTION_TIMEOUT_S = 10.0
OLD_TOKEN_RECONNECT_SHARE = 0.5
OLD_TOKEN_RECONNECT_TIMEOUT_S = 15.0


class Rotation:
    """`keys rotate` mid-run: nobody is thrown out, old tokens stay good, new ones move on.

    "Wrongly disconnected" is measured per device from the instant `keys rotate`
    returns until after the drain: the agent must record no failure at all (no
    connection the gateway closed, no CONNECT or token request refused) and must not
    connect more often than its own token refreshes and the reconnects the scenario
    asked for explain. Half the devices (chosen by the seeded RNG) are asked to
    reconnect as soon as the gateway has adopted the new key, while still holding a
    token signed by the old one: each must be admitted with that token. By the end,
    every device must have fetched at least one token after the rotation, and each
    device's current token must carry the new kid.
    """

    name = "rotation"
    summary = "signing key rotated mid-run: no device wrongly disconnected, new tokens new kid"

    def __init__(self) -> None:
        self.devices: list[VirtualDevice] = []
        self.before: dict[str, _Counters] = {}
        self.asked: dict[str, str] = {}
        """Devices asked to reconnect with their old token -> that token."""
        self.old_kid: str | None = None
        self.new_kid: str | None = None
        self.rotated_at_s: float | None = None
        self.adopted_ms: float | None = None
        self.jwks_after: list[str] = []
        self.reconnected_with_old_token = 0
        self.problems: list[str] = []

    def gateway_env(self, options: RunOptions) -> Mapping[str, str]:
        lifetime = options.token_lifetime or ROTATION_TOKEN_LIFETIME_S
        return {"GATEPASS_TOKEN_LIFETIME": str(lifetime)}

    async def before_run(self, ctx: RunContext) -> None:
        return None

    async def during_run(self, ctx: RunContext) -> None:
        await ctx.at(max(ROTATION_MIN_AT_S, ctx.options.duration * ROTATION_AT_FRACTION))
        self.devices = [vd for vd in ctx.fleet.connected if vd.agent is not None]
        kids = Counter(_current_kid(vd) for vd in self.devices)
        self.old_kid = kids.most_common(1)[0][0] if kids else None
        self.before = _snapshot(self.devices)
        out = await asyncio.to_thread(ctx.gateway.admin, "keys", "rotate", "--json")
        rotated = time.monotonic()
        self.rotated_at_s = round(ctx.elapsed(), 3)
        self.new_kid = str(json.loads(out)["current"])
        ctx.say(f"rotation: new signing key {self.new_kid} at t={self.rotated_at_s:.1f} s")
        if not await self._adopted(ctx, rotated):
            return
        await self._reconnect_with_old_tokens(ctx)

    async def _adopted(self, ctx: RunContext, rotated: float) -> bool:
        """Wait until the running gateway publishes the new key (it then signs with it)."""
        deadline = rotated + ADOPTION_TIMEOUT_S
        while time.monotonic() < deadline:
            kids = _jwks_kids(await asyncio.to_thread(_fetch_jwks, ctx.gateway))
            if self.new_kid in kids:
                self.adopted_ms = round((time.monotonic() - rotated) * 1000, 1)
                self.jwks_after = kids
                return True
            await asyncio.sleep(POLL_S)
        self.problems.append(
            f"rotation: the gateway did not publish key {self.new_kid} within "
            f"{ADOPTION_TIMEOUT_S:.0f} s"
        )
        return False

    async def _reconnect_with_old_tokens(self, ctx: RunContext) -> None:
        candidates = [
            vd
            for vd in self.devices
            if vd.require_agent().connected.is_set() and _current_kid(vd) == self.old_kid
        ]
        share = round(len(self.devices) * OLD_TOKEN_RECONNECT_SHARE)
        chosen = ctx.rng.sample(candidates, min(share, len(candidates)))
        for vd in chosen:
            agent = vd.require_agent()
            assert agent.tokens.current is not None
            self.asked[vd.device_id] = agent.tokens.current.value
            agent.request_reconnect()

        def back() -> bool:
            done = [vd for vd in chosen if self._reconnected(vd)]
            return len(done) == len(chosen)

        await wait_until(back, OLD_TOKEN_RECONNECT_TIMEOUT_S)
        self.reconnected_with_old_token = sum(
            1 for vd in chosen if self._reconnected(vd) and self._same_token(vd)
        )
        ctx.say(
            f"rotation: {self.reconnected_with_old_token} of {len(chosen)} devices "
            f"reconnected with a token of the old key"
        )

    def _reconnected(self, vd: VirtualDevice) -> bool:
        agent = vd.require_agent()
        return agent.stats.connects > self.before[vd.device_id].connects and (
            agent.connected.is_set()
        )

    def _same_token(self, vd: VirtualDevice) -> bool:
        token = vd.require_agent().tokens.current
        return token is not None and token.value == self.asked[vd.device_id]

    async def after_run(self, ctx: RunContext) -> ScenarioOutcome:
        wrongly: dict[str, Any] = {}
        fresh_tokens: list[int] = []
        final_kids: Counter[str | None] = Counter()
        for vd in self.devices:
            before, now = self.before[vd.device_id], _Counters.of(vd.require_agent())
            errors = now.errors_since(before)
            refreshes = now.refreshes - before.refreshes
            explained = refreshes + (1 if vd.device_id in self.asked else 0)
            extra = now.connects - before.connects - explained
            if errors or extra > 0:
                wrongly[vd.device_id] = {"errors": errors, "unexplained_connects": max(0, extra)}
            fresh_tokens.append(refreshes)
            final_kids[_current_kid(vd)] += 1
        on_new = final_kids.get(self.new_kid, 0)
        outcome = ScenarioOutcome(
            extra={
                "devices": len(self.devices),
                "old_kid": self.old_kid,
                "new_kid": self.new_kid,
                "rotated_at_s": self.rotated_at_s,
                "adopted_ms": self.adopted_ms,
                "jwks_after": self.jwks_after,
                "asked_to_reconnect": len(self.asked),
                "reconnected_with_old_token": self.reconnected_with_old_token,
                "tokens_after_rotation": _spread(fresh_tokens),
                "final_token_kids": {str(k): n for k, n in final_kids.items()},
                "wrongly_disconnected": len(wrongly),
                "wrongly_disconnected_devices": wrongly,
            },
            failures=list(self.problems),
        )
        failures = outcome.failures
        if self.new_kid is None:
            failures.append("rotation: the key was never rotated (run too short?)")
            return outcome
        if wrongly:
            failures.append(f"rotation: {len(wrongly)} devices wrongly disconnected: {wrongly}")
        if self.old_kid is not None and self.old_kid not in self.jwks_after:
            failures.append(f"rotation: the old key {self.old_kid} left the JWKS at once")
        if self.reconnected_with_old_token < len(self.asked):
            failures.append(
                f"rotation: only {self.reconnected_with_old_token} of {len(self.asked)} "
                "devices reconnected with their still valid token of the old key"
            )
        if on_new < len(self.devices):
            failures.append(
                f"rotation: only {on_new} of {len(self.devices)} devices hold a token of the "
                f"new key at the end (kids {dict(final_kids)}; is the run longer than "
                "the token lifetime?)"
            )
        return outcome


# -- revoke --------------------------------------------------------------------------------

REVOKE_SHARE = 0.10
REVOKE_AT_FRACTION = 0.3
REVOKE_SESSION_DEADLINE_S = 1.0
"""SPEC: revoke is immediate; live MQTT sessions are closed within 1 s."""
REVOKE_WAIT_S = 5.0


class Revoke:
    """10% of the devices are revoked mid-run (`Gateway.revoke`, the registry write that
    `gatepass-gateway device revoke` does), all in one transaction.

    Measured: for each revoked device, the time from the revoke returning to its
    link's `disconnected` future resolving (must be <= 1 s); every reconnect attempt
    its own agent makes afterwards (each must be refused) and three probes with its
    identity: CONNECT with its last, unexpired token, a token request and a
    `simplereenroll` (each must be refused). Everyone else must be untouched: from the
    revoke until after the drain no failure of any kind and no reconnect beyond its
    own token refreshes, and nothing lost. Revoked devices stop producing readings at
    the revoke; those that never reached the gateway are expected refusals, reported
    as `excused` (not sent, not lost); what the gateway acknowledged must be delivered.
    """

    name = "revoke"
    summary = "10% of devices revoked mid-run: sessions end within 1 s, others untouched"

    def __init__(self) -> None:
        self.revoked: list[VirtualDevice] = []
        self.others: list[VirtualDevice] = []
        self.before: dict[str, _Counters] = {}
        self.revoked_at_s: float | None = None
        self.ended_s: dict[str, float] = {}
        self.not_connected: list[str] = []
        self.probes: dict[str, Counter[str]] = {}
        self.let_in: list[str] = []

    def gateway_env(self, options: RunOptions) -> Mapping[str, str]:
        return {}

    async def before_run(self, ctx: RunContext) -> None:
        return None

    async def during_run(self, ctx: RunContext) -> None:
        await ctx.at(ctx.options.duration * REVOKE_AT_FRACTION)
        devices = [vd for vd in ctx.fleet.connected if vd.agent is not None]
        count = min(len(devices), max(1, round(len(devices) * REVOKE_SHARE)))
        self.revoked = ctx.rng.sample(devices, count)
        self.others = [vd for vd in devices if vd not in self.revoked]
        self.before = _snapshot(devices)
        sessions: dict[str, asyncio.Future[LinkClosed]] = {}
        tokens: dict[str, str] = {}
        for vd in self.revoked:
            agent = vd.require_agent()
            if agent.link.is_connected:
                sessions[vd.device_id] = agent.link.disconnected
            else:
                self.not_connected.append(vd.device_id)
            if agent.tokens.current is not None:
                tokens[vd.device_id] = agent.tokens.current.value
            ctx.fleet.withdraw(vd, keep_publishing=True)
        ids = [vd.device_id for vd in self.revoked]
        await asyncio.to_thread(ctx.gateway.revoke, ids)
        revoked = time.monotonic()
        self.revoked_at_s = round(ctx.elapsed(), 3)
        ctx.say(f"revoke: {len(ids)} devices revoked at t={self.revoked_at_s:.1f} s")
        for device_id, closed in sessions.items():
            closed.add_done_callback(self._ended(device_id, revoked))
        if sessions:
            await asyncio.wait(sessions.values(), timeout=REVOKE_WAIT_S)
        for vd in self.revoked:
            await self._probe(ctx, vd, tokens.get(vd.device_id))

    def _ended(self, device_id: str, revoked: float) -> Callable[[object], None]:
        def ended(_: object) -> None:
            self.ended_s.setdefault(device_id, max(0.0, time.monotonic() - revoked))

        return ended

    async def _probe(self, ctx: RunContext, vd: VirtualDevice, token: str | None) -> None:
        """Try to come back with the revoked identity: CONNECT, token, re-enroll."""
        identity = vd.require_agent().identity
        if token is not None:
            link, how = await _try_connect(ctx.gateway, identity, vd.device_id, token)
            if link is not None:
                await link.disconnect()
            self._record(vd, "connect_with_last_token", how, link is not None)
        client = GatewayClient(identity.gateway_url, identity.tls_context())
        try:
            how, ok = await _http_outcome(client.token, vd.device_id)
            self._record(vd, "token_request", how, ok)
            csr = build_csr(generate_p256_key(), vd.device_id)
            how, ok = await _http_outcome(client.simplereenroll, csr)
            self._record(vd, "reenroll", how, ok)
        finally:
            client.close()

    def _record(self, vd: VirtualDevice, kind: str, how: str, accepted: bool) -> None:
        self.probes.setdefault(kind, Counter())[how] += 1
        if accepted:
            self.let_in.append(f"{vd.device_id} {kind}")

    async def after_run(self, ctx: RunContext) -> ScenarioOutcome:
        if not self.revoked:
            return ScenarioOutcome(failures=["revoke: nobody was revoked (run too short?)"])
        late = {
            d: round(s * 1000, 1) for d, s in self.ended_s.items() if s > REVOKE_SESSION_DEADLINE_S
        }
        never = [
            vd.device_id
            for vd in self.revoked
            if vd.device_id not in self.ended_s and vd.device_id not in self.not_connected
        ]
        refused_attempts = 0
        came_back: list[str] = []
        for vd in self.revoked:
            before, now = self.before[vd.device_id], _Counters.of(vd.require_agent())
            errors = now.errors_since(before)
            refused_attempts += sum(n for kind, n in errors.items() if kind != "connection_lost")
            if now.connects > before.connects:
                came_back.append(vd.device_id)
        disturbed: dict[str, Any] = {}
        for vd in self.others:
            before, now = self.before[vd.device_id], _Counters.of(vd.require_agent())
            errors = now.errors_since(before)
            extra = now.connects - before.connects - (now.refreshes - before.refreshes)
            if errors or extra > 0:
                disturbed[vd.device_id] = {"errors": errors, "unexplained_connects": extra}
        ledger = ctx.fleet.ledger
        outcome = ScenarioOutcome(
            extra={
                "revoked_at_s": self.revoked_at_s,
                "revoked": {
                    "devices": len(self.revoked),
                    "ids": [vd.device_id for vd in self.revoked],
                    "session_end_ms": _ms_summary(self.ended_s.values()),
                    "sessions_ended_within_1s": sum(
                        1 for s in self.ended_s.values() if s <= REVOKE_SESSION_DEADLINE_S
                    ),
                    "not_connected_at_revoke": self.not_connected,
                    "reconnect_attempts_refused": refused_attempts,
                    "reconnected": came_back,
                    "probes": {k: dict(v) for k, v in sorted(self.probes.items())},
                    "messages": _ledger_counts(ledger, self.revoked),
                },
                "untouched": {
                    "devices": len(self.others),
                    "disturbed": len(disturbed),
                    "disturbed_devices": disturbed,
                    "messages": _ledger_counts(ledger, self.others),
                },
            }
        )
        failures = outcome.failures
        if late or never:
            failures.append(
                f"revoke: sessions not ended within {REVOKE_SESSION_DEADLINE_S:g} s: "
                f"late {late} (ms), never {never}"
            )
        if came_back or self.let_in:
            failures.append(f"revoke: revoked devices got back in: {came_back + self.let_in}")
        if disturbed:
            failures.append(f"revoke: {len(disturbed)} other devices disturbed: {disturbed}")
        return outcome


async def _http_outcome(call: Callable[..., object], *args: Any) -> tuple[str, bool]:
    """Run a blocking `GatewayClient` call; (how it ended, True if the gateway obliged)."""
    try:
        await asyncio.to_thread(call, *args)
    except GatewayRefused as exc:
        return f"http_{exc.status}", False
    except AgentError as exc:
        return type(exc).__name__, False
    return "accepted", True


def _ledger_counts(ledger: DeliveryLedger, devices: Iterable[VirtualDevice]) -> dict[str, int]:
    counts = Counter[str]()
    for vd in devices:
        rec = ledger.record(vd.device_id)
        if rec is None:
            continue
        counts["sent"] += rec.owed
        counts["acked"] += rec.acked
        counts["delivered"] += len(rec.delivered)
        counts["lost"] += len(rec.missing(rec.owed_upto))
        counts["excused"] += rec.excused
    return {k: counts[k] for k in ("sent", "acked", "delivered", "lost", "excused")}


# -- attack --------------------------------------------------------------------------------

HOSTILE_SHARE = 0.10
ATTACK_AT_FRACTION = 0.2
PROBE_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0
PUBACK_WAIT_S = 2.0
FORGED_SEQ = 1_000_000_000
"""The seq a hostile device puts in a reading it forges for its victim: never a real one."""
WIDE_ACL = [{"permission": "allow", "action": "all", "topic": "#"}]

SPEC_REFUSAL: Mapping[str, str] = {
    "forged_signature": "connack_5",
    "alg_none": "connack_5",
    "hs256_key_confusion": "connack_5",
    "expired_token": "connack_5",
    "other_device_token": "connack_5",
    "stolen_token": "connack_5",
    "subscribe_escalation": "suback_0x80",
    "publish_escalation": "not_delivered",
    "replayed_enrollment_secret": "http_401",
}
"""Every kind of attack, and the refusal the SPEC prescribes for it."""


@dataclass(slots=True, kw_only=True)
class _ForgedReading:
    """A reading a hostile device published on its victim's topic; marked by `nonce`."""

    attacker: str
    topic: str
    nonce: str
    pubacked: bool = False
    reasons: list[str] = field(default_factory=list)


class Attack:
    """A share of the devices (10%, at least one) turn hostile once connected.

    A hostile device stops publishing and its agent disconnects; then, with its own
    key, certificate and used enrollment secret, it tries (each counted in
    `attacks` by kind, each must be refused, in the form `SPEC_REFUSAL` gives):
    its own token with the claims altered (`acl` widened to `#`) under the original
    signature; the same claims as `alg: none`; as HS256 keyed with the gateway's
    public key (once the JWK's JSON, once its PEM); a genuinely expired token (every
    claim as the gateway issues them, times moved past `exp` + leeway, signed with
    the gateway's current key read from its state directory: the stand-in for an old
    token the device kept); an honest victim's valid token on its own certificate as
    itself, and as the victim (a stolen token on another certificate); with its own
    valid token, SUBSCRIBE to `devices/+/telemetry`, to the victim's telemetry and to
    `#`, and PUBLISH (QoS 1 and 0) a forged reading on the victim's telemetry topic,
    which must never reach the verifying subscriber (it sees every delivery); and
    `simpleenroll` again with its used secret. Honest devices must be untouched.
    """

    name = "attack"
    summary = "hostile devices try forged, expired, stolen tokens and escalation; all refused"

    def __init__(self) -> None:
        self.hostile: list[VirtualDevice] = []
        self.honest: list[VirtualDevice] = []
        self.before: dict[str, _Counters] = {}
        self.outcomes: dict[str, Counter[str]] = {}
        self.reasons: dict[str, Counter[str]] = {}
        self.forged: list[_ForgedReading] = []
        self.controls: list[str] = []
        """Nonces of allowed, marked messages hostile devices sent on their own topics."""
        self.seen: dict[str, str] = {}
        """Nonce of a marked message the verifier received -> the topic it came on."""
        self.mismatched = 0
        self.problems: list[str] = []
        self.finished = False

    def gateway_env(self, options: RunOptions) -> Mapping[str, str]:
        return {}

    async def before_run(self, ctx: RunContext) -> None:
        devices = [vd for vd in ctx.fleet.connected if vd.identity is not None]
        if len(devices) < 2:
            self.problems.append("attack: needs at least two connected devices")
            return
        count = min(len(devices) - 1, max(1, round(len(devices) * HOSTILE_SHARE)))
        self.hostile = ctx.rng.sample(devices, count)
        self.honest = [vd for vd in devices if vd not in self.hostile]
        for vd in self.hostile:
            ctx.fleet.withdraw(vd)
            await ctx.fleet.stop_agent(vd)
        if ctx.verifier is None:
            self.problems.append("attack: no verifying subscriber to watch deliveries")
        else:
            ctx.verifier.observers.append(self._observe)
        ctx.say(f"attack: {len(self.hostile)} hostile devices")

    async def during_run(self, ctx: RunContext) -> None:
        if not self.hostile:
            return
        await ctx.at(ctx.options.duration * ATTACK_AT_FRACTION)
        self.before = _snapshot(self.honest)
        jwks = await asyncio.to_thread(_fetch_jwks, ctx.gateway)
        for vd in self.hostile:
            victim = ctx.rng.choice(self.honest)
            await _Hostile(ctx, vd, victim, jwks, self).run()
        self.finished = True
        attempted = sum(sum(c.values()) for c in self.outcomes.values()) + len(self.forged)
        ctx.say(f"attack: {attempted} attempts made at t={ctx.elapsed():.1f} s")

    def record(
        self, kind: str, how: str, *, refused: bool, reasons: Iterable[str], metrics: Metrics
    ) -> None:
        """Count one attempt: how it ended, and why the gateway says it refused it."""
        metrics.attacks.attempt(kind, refused=refused)
        self.outcomes.setdefault(kind, Counter())[how] += 1
        for reason in reasons:
            self.reasons.setdefault(kind, Counter())[reason] += 1

    def _observe(self, message: InboundMessage) -> None:
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        nonce = body.get("hostile")
        if isinstance(nonce, str):
            self.seen[nonce] = message.topic
        parts = message.topic.split("/")
        if len(parts) == 3 and body.get("device_id") != parts[1]:
            self.mismatched += 1

    async def after_run(self, ctx: RunContext) -> ScenarioOutcome:
        for forged in self.forged:
            delivered = forged.nonce in self.seen
            how = "delivered" if delivered else "not_delivered"
            self.record(
                "publish_escalation",
                how,
                refused=not delivered,
                reasons=forged.reasons,
                metrics=ctx.metrics,
            )
        controls_seen = sum(1 for nonce in self.controls if nonce in self.seen)
        disturbed: dict[str, Any] = {}
        for vd in self.honest:
            if vd.device_id not in self.before:
                continue
            before, now = self.before[vd.device_id], _Counters.of(vd.require_agent())
            errors = now.errors_since(before)
            extra = now.connects - before.connects - (now.refreshes - before.refreshes)
            if errors or extra > 0:
                disturbed[vd.device_id] = {"errors": errors, "unexplained_connects": extra}
        off_spec = {
            kind: {how: n for how, n in hows.items() if how != SPEC_REFUSAL[kind]}
            for kind, hows in sorted(self.outcomes.items())
        }
        off_spec = {kind: hows for kind, hows in off_spec.items() if hows}
        outcome = ScenarioOutcome(
            extra={
                "hostile_devices": len(self.hostile),
                "hostile_ids": [vd.device_id for vd in self.hostile],
                "outcomes": {k: dict(v) for k, v in sorted(self.outcomes.items())},
                "refusal_reasons": {k: dict(v) for k, v in sorted(self.reasons.items())},
                "escalated_deliveries": sum(1 for f in self.forged if f.nonce in self.seen),
                "controls": {"sent": len(self.controls), "seen": controls_seen},
                "refused_publishes_pubacked": sum(1 for f in self.forged if f.pubacked),
                "mismatched_deliveries": self.mismatched,
                "honest_disturbed": len(disturbed),
                "honest_disturbed_devices": disturbed,
            },
            failures=list(self.problems),
        )
        failures = outcome.failures
        if self.hostile and not self.finished:
            failures.append("attack: the attacks did not finish within the run (run longer)")
        missing = sorted(set(SPEC_REFUSAL) - set(self.outcomes))
        if self.hostile and self.finished and missing:
            failures.append(f"attack: kinds never attempted: {missing}")
        if controls_seen < len(self.controls):
            failures.append(
                f"attack: the verifier saw only {controls_seen} of {len(self.controls)} allowed "
                "control messages, so it cannot vouch that forbidden ones were not delivered"
            )
        if off_spec:
            failures.append(f"attack: refused, but not as the SPEC says: {off_spec}")
        if self.mismatched:
            failures.append(
                f"attack: {self.mismatched} deliveries on a device's topic carried another "
                "device's reading"
            )
        if disturbed:
            failures.append(f"attack: {len(disturbed)} honest devices disturbed: {disturbed}")
        return outcome


class _Hostile:
    """One hostile device's attempts, with its own identity; the victim is honest.

    Around every attempt the gateway's refusal counters (`/metrics`) are read, so the
    report says why each attempt was refused (`connect:cnf_mismatch`, ...).
    """

    def __init__(
        self,
        ctx: RunContext,
        vd: VirtualDevice,
        victim: VirtualDevice,
        jwks: Mapping[str, Any],
        attack: Attack,
    ) -> None:
        assert vd.identity is not None
        self.ctx = ctx
        self.vd = vd
        self.identity = vd.identity
        self.victim = victim
        self.jwks = jwks
        self.attack = attack
        self._counts: Counter[str] = Counter()

    @property
    def me(self) -> str:
        return self.vd.device_id

    async def _mark(self) -> None:
        """Remember the gateway's refusal counters before an attempt."""
        self._counts = await self._refusals()

    async def _record(self, kind: str, how: str, *, refused: bool) -> None:
        """Count the attempt, with the refusal reasons the gateway counted since `_mark`."""
        reasons = sorted((await self._refusals() - self._counts).keys())
        self.attack.record(kind, how, refused=refused, reasons=reasons, metrics=self.ctx.metrics)

    async def _refusals(self) -> Counter[str]:
        try:
            return await asyncio.to_thread(_refusal_counts, self.ctx.gateway)
        except (OSError, http.client.HTTPException, ValueError):
            return Counter()

    def _problem(self, text: str) -> None:
        self.attack.problems.append(f"attack: {self.me}: {text}")

    async def run(self) -> None:
        own = await self._own_token()
        stolen = self.victim.require_agent().tokens.current
        if own is not None:
            await self._forgeries(own)
            await self._connect("expired_token", self.me, self._expired(own))
            await self._escalate(own)
        if stolen is None:
            self._problem(f"victim {self.victim.device_id} held no token; theft untested")
        else:
            await self._connect("other_device_token", self.me, stolen.value)
            await self._connect("stolen_token", self.victim.device_id, stolen.value)
        await self._replay_secret()

    async def _own_token(self) -> str | None:
        """A fresh, valid token of our own (mTLS with our certificate)."""
        client = GatewayClient(self.identity.gateway_url, self.identity.tls_context())
        try:
            grant = await asyncio.to_thread(client.token, self.me)
        except AgentError as exc:
            self._problem(f"could not get its own token ({exc}); token attacks untested")
            return None
        finally:
            client.close()
        return grant.access_token

    async def _connect(self, kind: str, client_id: str, token: str | None) -> None:
        if token is None:
            return
        await self._mark()
        link, how = await _try_connect(self.ctx.gateway, self.identity, client_id, token)
        if link is not None:
            await link.disconnect()
        await self._record(kind, how, refused=link is None)

    async def _forgeries(self, own: str) -> None:
        header, claims, signature = _jwt_parts(own)
        wide = {**claims, "acl": WIDE_ACL}
        unsigned = _jwt(header, wide, b"").rsplit(".", 1)[0]
        await self._connect("forged_signature", self.me, f"{unsigned}.{signature}")
        none_header = {"alg": "none", "typ": header.get("typ", "at+jwt")}
        await self._connect("alg_none", self.me, _jwt(none_header, wide, b""))
        kid = header.get("kid")
        jwk = next((k for k in self.jwks.get("keys", []) if k.get("kid") == kid), None)
        if jwk is None:
            self._problem(f"key {kid} is not in the JWKS; HS256 key confusion untested")
            return
        public = _jwk_public_key(jwk)
        hmac_keys = (
            json.dumps(jwk, separators=(",", ":")).encode(),
            public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        )
        hs_header = {**header, "alg": "HS256"}
        for hmac_key in hmac_keys:
            await self._connect("hs256_key_confusion", self.me, _hs256(hs_header, wide, hmac_key))

    def _expired(self, own: str) -> str | None:
        """Our own token as the gateway issued it, but past `exp` + leeway.

        Signed with the gateway's key from its state directory: the simulator stands in
        for a device that kept an old token. Without access to the key it is skipped.
        """
        header, claims, _ = _jwt_parts(own)
        try:
            key = StateDir(self.ctx.gateway.root).load_signing_key(str(header["kid"]))
        except (OSError, GatepassError, KeyError) as exc:
            self._problem(f"cannot read the gateway's signing key ({exc}); expiry untested")
            return None
        lifetime = int(claims["exp"]) - int(claims["iat"])
        exp = int(time.time()) - LEEWAY_SECONDS - 60
        old = {
            **claims,
            "iat": exp - lifetime,
            "nbf": exp - lifetime,
            "exp": exp,
            "jti": secrets.token_urlsafe(16),
        }
        return _es256(header, old, key.private_key)

    async def _escalate(self, own: str) -> None:
        """With our own valid token: subscribe to others' topics, publish on one."""
        victim = self.victim.device_id
        control = await self._control(own)
        if not control:
            return
        for topic_filter in (TELEMETRY_FILTER, f"devices/{victim}/telemetry", "#"):
            link = await self._own_session(own)
            if link is None:
                return
            await self._mark()
            try:
                await asyncio.wait_for(link.subscribe(topic_filter, 1), PROBE_TIMEOUT_S)
            except SubscribeRefused:
                how, refused = "suback_0x80", True
            except (LinkError, TimeoutError) as exc:
                how, refused = type(exc).__name__, True
            else:
                how, refused = "granted", False
            finally:
                await link.disconnect()
            await self._record("subscribe_escalation", how, refused=refused)
        for qos in (1, 0):
            link = await self._own_session(own)
            if link is None:
                return
            forged = _ForgedReading(
                attacker=self.me, topic=f"devices/{victim}/telemetry", nonce=secrets.token_hex(8)
            )
            reading = {"device_id": victim, "seq": FORGED_SEQ, "ts": time.time()}
            await self._mark()
            acked = await self._publish(
                link, forged.topic, {**reading, "hostile": forged.nonce}, qos
            )
            forged.pubacked = acked and qos == 1
            forged.reasons = sorted((await self._refusals() - self._counts).keys())
            self.attack.forged.append(forged)

    async def _control(self, own: str) -> bool:
        """Publish a marked message on our own telemetry topic (allowed): the verifier
        must see it, or it would not see a forbidden one either."""
        link = await self._own_session(own)
        if link is None:
            return False
        nonce = secrets.token_hex(8)
        self.attack.controls.append(nonce)
        body = {"device_id": self.me, "hostile": nonce}  # no seq: not a reading
        await self._publish(link, f"devices/{self.me}/telemetry", body, 1)
        return True

    async def _publish(self, link: MqttLink, topic: str, body: Mapping[str, Any], qos: int) -> bool:
        """PUBLISH, wait (bounded) for its PUBACK or for the gateway to hang up, and
        disconnect; True if it was acknowledged (QoS 0: written)."""
        try:
            sent = link.publish(topic, json.dumps(dict(body)).encode(), qos)
            waiting: list[asyncio.Future[Any]] = [sent, link.disconnected]
            await asyncio.wait(waiting, timeout=PUBACK_WAIT_S)
        except LinkError:
            return False
        finally:
            await link.disconnect()
        return sent.done() and not sent.cancelled() and sent.exception() is None

    async def _own_session(self, own: str) -> MqttLink | None:
        link, how = await _try_connect(self.ctx.gateway, self.identity, self.me, own)
        if link is None:
            self._problem(f"its own valid token was refused ({how}); escalation untested")
        return link

    async def _replay_secret(self) -> None:
        https = self.ctx.gateway.require_endpoints().https
        client = GatewayClient(https, trust_context(self.ctx.gateway.ca_file.read_bytes()))
        csr = build_csr(generate_p256_key(), self.me)
        await self._mark()
        try:
            how, accepted = await _http_outcome(client.simpleenroll, self.me, self.vd.secret, csr)
        finally:
            client.close()
        await self._record("replayed_enrollment_secret", how, refused=not accepted)


def _jwk_public_key(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    def coordinate(name: str) -> int:
        value = str(jwk[name])
        return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")

    numbers = ec.EllipticCurvePublicNumbers(coordinate("x"), coordinate("y"), ec.SECP256R1())
    return numbers.public_key()


def _hs256(header: Mapping[str, Any], claims: Mapping[str, Any], secret: bytes) -> str:
    unsigned = _jwt(header, claims, b"").rsplit(".", 1)[0]
    mac = hmac.new(secret, unsigned.encode("ascii"), hashlib.sha256).digest()
    return f"{unsigned}.{_b64url(mac)}"


def _es256(
    header: Mapping[str, Any], claims: Mapping[str, Any], key: ec.EllipticCurvePrivateKey
) -> str:
    unsigned = _jwt(header, claims, b"").rsplit(".", 1)[0]
    der = key.sign(unsigned.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{unsigned}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


# -- chaos ---------------------------------------------------------------------------------

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
