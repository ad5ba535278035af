"""The verifying subscriber: a backend device that receives every telemetry message.

Owns: one backend identity (enrolled through EST like any device, with the ACL
`subscribe devices/+/telemetry`), its connection supervisor (token over mTLS,
persistent session, QoS 1 subscription renewed on every connection, a fresh token
before the old one runs out, jittered backoff after failures), decoding each delivery
and handing it to the `DeliveryLedger`, and the publish-to-delivery latency (now minus
the payload's `ts`). Must not: decide what counts as a loss (`simulator.ledger` does).

It is built from the agent's own parts (`GatewayClient`, `TokenKeeper`, `MqttLink`),
not from `agent.device.Device`, so that it owns its subscription and never publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.device import parse_mqtt_url
from agent.errors import AgentError
from agent.gateway_client import GatewayClient
from agent.identity import DeviceIdentity
from agent.mqtt_link import InboundMessage, LinkClosed, LinkError, MqttLink
from agent.tokens import TokenKeeper, backoff_delay
from simulator.ledger import Delivery, DeliveryLedger

__all__ = ["TELEMETRY_FILTER", "Verifier", "VerifierStats"]

log = logging.getLogger("gatepass.simulator")

TELEMETRY_FILTER = "devices/+/telemetry"
KEEPALIVE = 30
TOKEN_MARGIN_S = 5.0

DeliveryHook = Callable[[str, int, Delivery, float], None]
"""Called with device id, seq, classification and publish-to-delivery seconds."""


@dataclass(slots=True)
class VerifierStats:
    connects: int = 0
    token_refreshes: int = 0
    messages: int = 0
    malformed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Verifier:
    """Run with `start()`; wait for `subscribed`; `stop()` at the end."""

    def __init__(
        self,
        identity: DeviceIdentity,
        ledger: DeliveryLedger,
        *,
        on_delivery: DeliveryHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if identity.mqtt_url is None:
            raise AgentError("the verifier's identity has no MQTT URL")
        self.host, self.port, self._tls = parse_mqtt_url(identity.mqtt_url)
        self.identity = identity
        self.ledger = ledger
        self.stats = VerifierStats()
        self.subscribed = asyncio.Event()
        self._on_delivery = on_delivery
        self.observers: list[Callable[[InboundMessage], None]] = []
        """Called with every raw delivery first (a scenario may watch for forbidden ones)."""
        self._clock = clock
        self._rng = random.Random()
        self._tls_context = identity.tls_context()  # one context: its TLS sessions resume
        self._client = GatewayClient(identity.gateway_url, self._tls_context)
        self._tokens = TokenKeeper(self._client, identity.device_id, self._rng)
        self._link = MqttLink(on_message=self._message)
        self._task: asyncio.Task[None] | None = None

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="verifier")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._link.disconnect()
        self._client.close()

    # -- connection supervisor ----------------------------------------------------------

    async def _supervise(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
                attempt = 0
            except (AgentError, LinkError, OSError) as exc:
                attempt += 1
                kind = type(exc).__name__
                self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1
                log.warning("verifier: %s: %s", kind, exc)
                await asyncio.sleep(backoff_delay(attempt, self._rng, base=0.2, cap=5.0))

    async def _session(self) -> None:
        token = self._tokens.current
        if token is None or token.remaining(self._tokens.now()) < TOKEN_MARGIN_S:
            token = await self._tokens.fetch()
            self.stats.token_refreshes += 1
        await self._link.connect(
            self.host,
            self.port,
            client_id=self.device_id,
            username=self.device_id,
            password=token.value,
            tls_context=self._tls_context if self._tls else None,
            clean_session=False,
            keepalive=KEEPALIVE,
        )
        self.stats.connects += 1
        try:
            await self._link.subscribe(TELEMETRY_FILTER, 1)
            self.subscribed.set()
            closed: asyncio.Future[LinkClosed] = asyncio.shield(self._link.disconnected)
            refresh: asyncio.Future[None] = asyncio.ensure_future(
                asyncio.sleep(self._tokens.refresh_in())
            )
            try:
                waiting: list[asyncio.Future[Any]] = [closed, refresh]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                refresh.cancel()
            if not closed.done():  # time for a new token: reconnect with it
                await self._tokens.fetch()
                self.stats.token_refreshes += 1
        finally:
            await self._link.disconnect()

    # -- deliveries -----------------------------------------------------------------------

    def _message(self, message: InboundMessage) -> None:
        self.stats.messages += 1
        for observe in self.observers:
            observe(message)
        try:
            body = json.loads(message.payload)
            device_id, seq, ts = str(body["device_id"]), int(body["seq"]), float(body["ts"])
        except (ValueError, KeyError, TypeError):
            self.stats.malformed += 1
            return
        outcome = self.ledger.delivered(device_id, seq)
        if self._on_delivery is not None:
            self._on_delivery(device_id, seq, outcome, self._clock() - ts)
