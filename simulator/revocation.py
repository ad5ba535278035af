"""The `revoke` scenario: a share of the devices is revoked mid-run.

Owns: its promise and how it is checked: the revoked devices' sessions end within 1 s
and they cannot come back (their own agents' reconnects, and probes with their
identities: CONNECT, token request, re-enroll), and everyone else is untouched (see
`Revoke`).
Must not: drive honest devices beyond the agent's public API, or touch the report's
fixed keys. The probes use the revoked devices' own identities.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from agent.gateway_client import GatewayClient
from agent.mqtt_link import LinkClosed
from shared.pki import build_csr, generate_p256_key
from simulator.fleet import VirtualDevice
from simulator.ledger import DeliveryLedger
from simulator.probes import AgentCounters, disturbances, http_outcome, snapshot, try_connect
from simulator.scenario import RunContext, RunOptions, ScenarioOutcome
from simulator.stats import summarize

__all__ = ["REVOKE_SESSION_DEADLINE_S", "Revoke"]

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
        self.before: dict[str, AgentCounters] = {}
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
        self.before = snapshot(devices)
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
            link, how = await try_connect(ctx.gateway, identity, vd.device_id, token)
            if link is not None:
                await link.disconnect()
            self._record(vd, "connect_with_last_token", how, link is not None)
        client = GatewayClient(identity.gateway_url, identity.tls_context())
        try:
            how, ok = await http_outcome(client.token, vd.device_id)
            self._record(vd, "token_request", how, ok)
            csr = build_csr(generate_p256_key(), vd.device_id)
            how, ok = await http_outcome(client.simplereenroll, csr)
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
            before, now = self.before[vd.device_id], AgentCounters.of(vd.require_agent())
            errors = now.errors_since(before)
            refused_attempts += sum(n for kind, n in errors.items() if kind != "connection_lost")
            if now.connects > before.connects:
                came_back.append(vd.device_id)
        disturbed = disturbances(self.others, self.before)
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


def _ms_summary(seconds: Iterable[float]) -> dict[str, float | int | None]:
    return summarize([s * 1000.0 for s in seconds]).as_dict()
