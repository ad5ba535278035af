"""The `rotation` scenario: the signing key is rotated mid-run.

Owns: its promise and how it is checked: no device is wrongly disconnected, tokens of
the old key still open sessions, and by the end every device holds a token of the new
kid (see `Rotation`).
Must not: drive honest devices beyond the agent's public API (it reads their counters
and tokens, and asks some to reconnect), or touch the report's fixed keys.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from simulator.fleet import POLL_S, VirtualDevice, wait_until
from simulator.jws import token_kid
from simulator.probes import AgentCounters, fetch_jwks, snapshot
from simulator.scenario import RunContext, RunOptions, ScenarioOutcome
from simulator.stats import spread

__all__ = ["ROTATION_TOKEN_LIFETIME_S", "Rotation"]

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
        self.before: dict[str, AgentCounters] = {}
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
        self.before = snapshot(self.devices)
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
            kids = _jwks_kids(await asyncio.to_thread(fetch_jwks, ctx.gateway))
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
            before, now = self.before[vd.device_id], AgentCounters.of(vd.require_agent())
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
                "tokens_after_rotation": spread(fresh_tokens),
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


def _current_kid(vd: VirtualDevice) -> str | None:
    token = vd.require_agent().tokens.current
    return token_kid(token.value if token else None)


def _jwks_kids(jwks: Mapping[str, Any]) -> list[str]:
    return sorted(str(k.get("kid")) for k in jwks.get("keys", []))
