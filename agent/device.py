"""One device's life: tokens, certificate renewal, the MQTT connection, telemetry.

Owns: the supervisor that keeps a device connected with a fresh token (refresh at a
random point in 50-80 % of its life, then reconnect before it expires), renews the
certificate at about two thirds of its life, reconnects with jittered backoff after
any failure, produces telemetry every `interval`, hands commands to a callback or a
program, and reports its state in `DIR/status.json`. Many devices can share one event
loop: nothing here blocks it (HTTPS runs in worker threads, MQTT is `agent.mqtt_link`).
Must not: decide what is stored or resent (`agent.publisher` and `agent.outbox` do).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from agent.enrollment import renew_certificate, renewal_due
from agent.errors import AgentError, GatewayRefused
from agent.gateway_client import GatewayClient
from agent.identity import DeviceIdentity
from agent.mqtt_link import ConnectRefused, InboundMessage, LinkError, MqttLink
from agent.outbox import Outbox, OutboxMessage
from agent.publisher import Publisher
from agent.telemetry import reading_payload
from agent.tokens import TokenKeeper, backoff_delay
from shared.pki import write_file_atomic

__all__ = ["Device", "DeviceOptions", "run_device"]

log = logging.getLogger("gatepass.agent")

# 5 "not authorized" from Gatepass and mosquitto; RabbitMQ answers a bad token with 4.
CONNACK_TOKEN_REFUSED = frozenset({4, 5})
KEEPALIVE = 30
DRAIN_BEFORE_RECONNECT = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceOptions:
    mqtt_url: str | None
    interval: float = 10.0
    count: int | None = None
    command: str | None = None
    outbox_max_messages: int = 100_000
    outbox_max_bytes: int = 64 * 1024 * 1024
    outbox_sync: Literal["FULL", "NORMAL"] = "FULL"
    telemetry: bool = True
    status_file: bool = True
    """Keep `DIR/status.json` (read by `gatepass-agent status`); synced on every change."""
    host_readings: bool = True
    """Readings carry this host's load, memory and CPU temperature. Simulated devices
    that share one host leave them out: 5,000 of them read /proc 1,500 times a second."""


@dataclass(slots=True)
class DeviceStats:
    connects: int = 0
    connect_failures: int = 0
    token_refreshes: int = 0
    cert_renewals: int = 0
    last_error: str | None = None
    errors: dict[str, int] = field(default_factory=dict)

    def failed(self, kind: str, message: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = message


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """`mqtts://host:port` (TLS, default 8883) or `mqtt://host:port` (plain, 1883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise AgentError(f"MQTT URL must be mqtts://HOST:PORT or mqtt://HOST:PORT, not {url!r}")
    tls = parts.scheme == "mqtts"
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


class Device:
    """One agent: run it with `await device.run()`; publish through `device.publish`."""

    def __init__(
        self,
        identity: DeviceIdentity,
        options: DeviceOptions,
        *,
        on_command: Callable[[InboundMessage], None] | None = None,
        on_ack: Callable[[OutboxMessage, float], None] | None = None,
        on_connected: Callable[[float], None] | None = None,
        outbox: Outbox | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if options.mqtt_url is None:
            raise AgentError("no MQTT URL: pass --mqtt mqtts://HOST:PORT")
        self.host, self.port, self._tls = parse_mqtt_url(options.mqtt_url)
        self.identity = identity
        self.options = options
        self.stats = DeviceStats()
        self._rng = rng or random.Random()
        self._on_command = on_command
        self._on_connected = on_connected
        self.outbox = outbox or Outbox.open(
            identity.layout.outbox,
            options.outbox_max_messages,
            options.outbox_max_bytes,
            synchronous=options.outbox_sync,
        )
        self.publisher = Publisher(self.outbox, on_ack=on_ack)
        # One TLS context per identity: building one re-reads the CA, key and certificate.
        self._tls_context = identity.tls_context()
        self._client = GatewayClient(identity.gateway_url, self._tls_context)
        self.tokens = TokenKeeper(self._client, identity.device_id, self._rng)
        self.link = MqttLink(on_message=self._command)
        self._topic = f"devices/{identity.device_id}/telemetry"
        self._reconnect = asyncio.Event()
        self.connected = asyncio.Event()

    @property
    def device_id(self) -> str:
        return self.identity.device_id

    def publish(self, topic: str, payload: bytes) -> int:
        """Store a message of our own in the outbox; it is sent (QoS 1) when connected."""
        return self.publisher.enqueue(topic, payload)

    def publish_reading(self) -> int:
        """Store the next telemetry reading; returns its `seq`."""
        seq, _ = self.publisher.enqueue_telemetry(
            self._topic,
            lambda s: reading_payload(
                self.device_id, s, self.tokens.now(), host=self.options.host_readings
            ),
        )
        return seq

    def request_reconnect(self) -> None:
        """Drop the current connection and connect again (e.g. a reconnect storm)."""
        self._reconnect.set()

    async def run(self) -> int:
        """Run until `count` readings are acknowledged (exit code 0) or cancelled."""
        tasks = [asyncio.create_task(self._connection_loop(), name=f"{self.device_id}-mqtt")]
        if self.options.telemetry:
            tasks.append(asyncio.create_task(self._telemetry(), name=f"{self.device_id}-telemetry"))
        try:
            if self.options.count is None:
                await asyncio.gather(*tasks)
                return 0
            await self._until_count_acked()
            return 0
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.link.disconnect()
            self._client.close()
            self._write_status()

    async def close(self) -> None:
        self.outbox.close()

    # --- telemetry -----------------------------------------------------------------------

    async def _telemetry(self) -> None:
        count = self.options.count
        next_at = time.monotonic()
        while count is None or self.outbox.last_seq < count:
            self.publish_reading()
            next_at += self.options.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _until_count_acked(self) -> None:
        count = self.options.count
        assert count is not None
        while self.outbox.last_seq < count or self.outbox.depth():
            await asyncio.sleep(min(self.options.interval, 0.5) / 2)

    # --- connection supervisor -----------------------------------------------------------

    async def _connection_loop(self) -> None:
        attempt = 0
        while True:
            try:
                await self._renew_certificate_if_due()
                await self._ensure_token()
                await self._connect()
                attempt = 0
                await self._serve_connection()
            except (AgentError, LinkError, OSError) as exc:
                attempt += 1
                self._record_failure(exc)
                await asyncio.sleep(backoff_delay(attempt, self._rng))

    async def _connect(self) -> None:
        token = self.tokens.current
        assert token is not None
        started = time.monotonic()
        try:
            await self.link.connect(
                self.host,
                self.port,
                client_id=self.device_id,
                username=self.device_id,
                password=token.value,
                tls_context=self._tls_context if self._tls else None,
                clean_session=False,
                keepalive=KEEPALIVE,
            )
        except ConnectRefused as exc:
            if exc.rc in CONNACK_TOKEN_REFUSED:
                self.tokens.current = None  # fetch a new one before trying again
            raise
        self.stats.connects += 1
        if self._on_connected is not None:  # seconds for TCP + TLS + CONNACK
            self._on_connected(time.monotonic() - started)
        await self.link.subscribe(f"devices/{self.device_id}/commands/#", 1)
        self._write_status()
        self.connected.set()

    async def _serve_connection(self) -> None:
        """Publish until the connection ends, or until the token must be refreshed."""
        publishing = asyncio.create_task(self.publisher.run(self.link))
        refresh = asyncio.create_task(asyncio.sleep(self.tokens.refresh_in()))
        renewal = asyncio.create_task(self._sleep_until_renewal())
        reconnect = asyncio.create_task(self._reconnect.wait())
        try:
            await asyncio.wait(
                {publishing, refresh, renewal, reconnect}, return_when=asyncio.FIRST_COMPLETED
            )
            if not publishing.done():
                if refresh.done():
                    await self._refresh_token()
                self._reconnect.clear()
                await self._drain_in_flight()
                await self.link.disconnect()
                await publishing
            else:
                closed = publishing.result()
                self.stats.failed("connection_lost", f"connection lost: {closed.reason}")
        finally:
            self.connected.clear()
            for task in (publishing, refresh, renewal, reconnect):
                task.cancel()
            await asyncio.gather(publishing, refresh, renewal, reconnect, return_exceptions=True)

    async def _drain_in_flight(self) -> None:
        deadline = time.monotonic() + DRAIN_BEFORE_RECONNECT
        while self.link.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    # --- tokens and certificates ---------------------------------------------------------

    async def _ensure_token(self) -> None:
        token = self.tokens.current
        if token is None or token.remaining(self.tokens.now()) < 5:
            await self._refresh_token()

    async def _refresh_token(self) -> None:
        token = await self.tokens.fetch()
        self.stats.token_refreshes += 1
        self._write_status(token_expires_at=token.expires_at)

    async def _sleep_until_renewal(self) -> None:
        await asyncio.sleep(max(0.0, renewal_due(self.identity, self.tokens.now())))

    async def _renew_certificate_if_due(self) -> None:
        if renewal_due(self.identity, self.tokens.now()) > 0:
            return
        self.identity = await asyncio.to_thread(renew_certificate, self.identity, self._client)
        self._client.close()
        self._tls_context = self.identity.tls_context()
        self._client = GatewayClient(self.identity.gateway_url, self._tls_context)
        self.tokens = TokenKeeper(self._client, self.device_id, self._rng)
        self.stats.cert_renewals += 1
        log.info("%s: certificate renewed until %s", self.device_id, self.identity.not_after)

    # --- commands and status -------------------------------------------------------------

    def _command(self, message: InboundMessage) -> None:
        if self._on_command is not None:
            self._on_command(message)
        elif self.options.command:
            task = asyncio.create_task(self._run_command(message))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _run_command(self, message: InboundMessage) -> None:
        argv = shlex.split(self.options.command or "")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            env={"GATEPASS_TOPIC": message.topic, "PATH": "/usr/bin:/bin"},
        )
        await proc.communicate(message.payload)

    def _record_failure(self, exc: BaseException) -> None:
        kind = type(exc).__name__
        if isinstance(exc, GatewayRefused) and exc.status == 401:
            kind = "token_refused"
        self.stats.failed(kind, f"{kind}: {exc}")
        log.warning("%s: %s", self.device_id, self.stats.last_error)
        self._write_status()

    def _write_status(self, token_expires_at: float | None = None) -> None:
        if not self.options.status_file:
            return
        token = self.tokens.current
        status = {
            "token_expires_at": token_expires_at or (token.expires_at if token else None),
            "last_error": self.stats.last_error,
            "last_seq": self.outbox.last_seq,
            "connects": self.stats.connects,
            "token_refreshes": self.stats.token_refreshes,
            "cert_renewals": self.stats.cert_renewals,
        }
        with contextlib.suppress(OSError):
            write_file_atomic(self.identity.layout.status, json.dumps(status).encode(), 0o600)


async def run_device(identity: DeviceIdentity, options: DeviceOptions) -> int:
    """The `run` command: one device until `count` is reached or it is stopped."""
    import signal

    device = Device(identity, options)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await device.run()
    except asyncio.CancelledError:
        return 0
    finally:
        await device.close()
