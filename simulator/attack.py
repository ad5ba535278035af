"""The `attack` scenario: a share of the devices turn hostile.

Owns: its promise and how it is checked: every attempt a hostile device makes with its
own identity (forged, expired and other devices' tokens, topic escalation, a stolen
token, a replayed enrollment secret) is refused in the form `SPEC_REFUSAL` gives, is
counted with the reason the gateway's `/metrics` gives, and honest devices are
untouched (see `Attack`).
Must not: drive honest devices beyond the agent's public API (a victim's token is only
read), or touch the report's fixed keys. Hostile devices use their own identities (key,
certificate, used enrollment secret) through the agent's `MqttLink` and `GatewayClient`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.errors import AgentError
from agent.gateway_client import GatewayClient
from agent.identity import trust_context
from agent.mqtt_link import InboundMessage, LinkError, MqttLink, SubscribeRefused
from gateway.statedir import StateDir
from shared.errors import GatepassError
from shared.pki import build_csr, generate_p256_key
from shared.tokens import LEEWAY_SECONDS
from simulator.fleet import VirtualDevice
from simulator.gateway_process import Gateway
from simulator.jws import compact_jws, jwk_public_key, jws_parts, sign_es256, sign_hs256
from simulator.metrics import Metrics
from simulator.probes import (
    PROBE_TIMEOUT_S,
    AgentCounters,
    disturbances,
    fetch_jwks,
    http_outcome,
    https_get,
    snapshot,
    try_connect,
)
from simulator.scenario import RunContext, RunOptions, ScenarioOutcome
from simulator.verifier import TELEMETRY_FILTER

__all__ = ["SPEC_REFUSAL", "Attack"]

HOSTILE_SHARE = 0.10
ATTACK_AT_FRACTION = 0.2
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
        self.before: dict[str, AgentCounters] = {}
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
        self.before = snapshot(self.honest)
        jwks = await asyncio.to_thread(fetch_jwks, ctx.gateway)
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
        disturbed = disturbances(self.honest, self.before)
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
        link, how = await try_connect(self.ctx.gateway, self.identity, client_id, token)
        if link is not None:
            await link.disconnect()
        await self._record(kind, how, refused=link is None)

    async def _forgeries(self, own: str) -> None:
        header, claims, signature = jws_parts(own)
        wide = {**claims, "acl": WIDE_ACL}
        unsigned = compact_jws(header, wide, b"").rsplit(".", 1)[0]
        await self._connect("forged_signature", self.me, f"{unsigned}.{signature}")
        none_header = {"alg": "none", "typ": header.get("typ", "at+jwt")}
        await self._connect("alg_none", self.me, compact_jws(none_header, wide, b""))
        kid = header.get("kid")
        jwk = next((k for k in self.jwks.get("keys", []) if k.get("kid") == kid), None)
        if jwk is None:
            self._problem(f"key {kid} is not in the JWKS; HS256 key confusion untested")
            return
        public = jwk_public_key(jwk)
        hmac_keys = (
            json.dumps(jwk, separators=(",", ":")).encode(),
            public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        )
        hs_header = {**header, "alg": "HS256"}
        for hmac_key in hmac_keys:
            await self._connect(
                "hs256_key_confusion", self.me, sign_hs256(hs_header, wide, hmac_key)
            )

    def _expired(self, own: str) -> str | None:
        """Our own token as the gateway issued it, but past `exp` + leeway.

        Signed with the gateway's key from its state directory: the simulator stands in
        for a device that kept an old token. Without access to the key it is skipped.
        """
        header, claims, _ = jws_parts(own)
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
        return sign_es256(header, old, key.private_key)

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
        link, how = await try_connect(self.ctx.gateway, self.identity, self.me, own)
        if link is None:
            self._problem(f"its own valid token was refused ({how}); escalation untested")
        return link

    async def _replay_secret(self) -> None:
        https = self.ctx.gateway.require_endpoints().https
        client = GatewayClient(https, trust_context(self.ctx.gateway.ca_file.read_bytes()))
        csr = build_csr(generate_p256_key(), self.me)
        await self._mark()
        try:
            how, accepted = await http_outcome(client.simpleenroll, self.me, self.vd.secret, csr)
        finally:
            client.close()
        await self._record("replayed_enrollment_secret", how, refused=not accepted)


_REFUSAL_METRIC = re.compile(
    r"^gatepass_mqtt_(connects|subscribes_refused|publishes_refused)_total\{([^}]*)\}\s+(\S+)$",
    re.MULTILINE,
)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _refusal_counts(gateway: Gateway) -> Counter[str]:
    """The MQTT listener's refusals so far, from `/metrics`: `connect:bad_token` -> n."""
    text = https_get(gateway, "/metrics").decode("utf-8", "replace")
    counts: Counter[str] = Counter()
    for metric, labels, value in _REFUSAL_METRIC.findall(text):
        label = dict(_LABEL.findall(labels))
        if label.get("outcome", "refused") != "refused":
            continue
        what = {"connects": "connect", "subscribes_refused": "subscribe"}.get(metric, "publish")
        counts[f"{what}:{label.get('reason', '?')}"] += round(float(value))
    return counts
