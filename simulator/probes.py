"""What the scenarios that go beyond the agent's public API use to look and to knock.

Owns: snapshots of an agent's counters and the comparison "was this device disturbed
since?" (`AgentCounters`, `snapshot`, `disturbances`); reading the gateway over HTTPS
while trusting only its CA (`https_get`, `fetch_jwks`); a CONNECT with an identity,
client id and token of the scenario's choosing (`try_connect`); and how a blocking
`GatewayClient` call ended (`http_outcome`).
Must not: decide whether a scenario passed (each scenario does), or drive honest
devices: their agents are only read here.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from agent.device import Device, parse_mqtt_url
from agent.errors import AgentError, GatewayRefused
from agent.identity import DeviceIdentity, trust_context
from agent.mqtt_link import ConnectRefused, LinkError, MqttLink
from simulator.fleet import VirtualDevice
from simulator.gateway_process import Gateway

__all__ = [
    "HTTP_TIMEOUT_S",
    "PROBE_TIMEOUT_S",
    "AgentCounters",
    "disturbances",
    "fetch_jwks",
    "http_outcome",
    "https_get",
    "snapshot",
    "try_connect",
]

PROBE_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class AgentCounters:
    """What one agent had counted at one instant (compared before and after an event)."""

    connects: int
    refreshes: int
    errors: Mapping[str, int]

    @classmethod
    def of(cls, agent: Device) -> AgentCounters:
        stats = agent.stats
        return cls(stats.connects, stats.token_refreshes, dict(stats.errors))

    def errors_since(self, before: AgentCounters) -> dict[str, int]:
        """Failures the agent recorded after `before` (kind -> count)."""
        return {
            kind: n - before.errors.get(kind, 0)
            for kind, n in sorted(self.errors.items())
            if n > before.errors.get(kind, 0)
        }


def snapshot(devices: Iterable[VirtualDevice]) -> dict[str, AgentCounters]:
    return {vd.device_id: AgentCounters.of(vd.require_agent()) for vd in devices}


def disturbances(
    devices: Iterable[VirtualDevice], before: Mapping[str, AgentCounters]
) -> dict[str, Any]:
    """Devices that, since `before`, recorded a failure or connected more often than
    their own token refreshes explain: device id -> errors and unexplained connects.
    Devices without a snapshot in `before` are skipped."""
    disturbed: dict[str, Any] = {}
    for vd in devices:
        if vd.device_id not in before:
            continue
        then, now = before[vd.device_id], AgentCounters.of(vd.require_agent())
        errors = now.errors_since(then)
        extra = now.connects - then.connects - (now.refreshes - then.refreshes)
        if errors or extra > 0:
            disturbed[vd.device_id] = {"errors": errors, "unexplained_connects": extra}
    return disturbed


def https_get(gateway: Gateway, path: str) -> bytes:
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


def fetch_jwks(gateway: Gateway) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(https_get(gateway, "/.well-known/jwks.json"))
    return data


async def try_connect(
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


async def http_outcome(call: Callable[..., object], *args: Any) -> tuple[str, bool]:
    """Run a blocking `GatewayClient` call; (how it ended, True if the gateway obliged)."""
    try:
        await asyncio.to_thread(call, *args)
    except GatewayRefused as exc:
        return f"http_{exc.status}", False
    except AgentError as exc:
        return type(exc).__name__, False
    return "accepted", True
