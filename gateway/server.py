"""`gatepass-gateway serve`: both listeners in one process and event loop.

Owns: the start-up and shutdown order (registry -> HTTPS -> MQTT -> watcher ->
`run/endpoints.json`; the reverse on SIGTERM/SIGINT, draining within a timeout).
Must not: hold protocol logic; the listeners are adapters around the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.http_api import build_app
from gateway.mqtt_broker import BrokerLimits, SecureBroker
from gateway.mqtt_sessions import SessionStore
from gateway.open_files import raise_open_file_limit
from gateway.runtime import Gateway, Snapshot
from gateway.tls import server_context
from shared.gc_policy import FullCollectionPolicy, run_collector

__all__ = ["RunningGateway", "run_gateway", "serve"]

log = logging.getLogger("gatepass.server")

SHUTDOWN_TIMEOUT = 5.0
LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class RunningGateway:
    gateway: Gateway
    https_port: int
    mqtt_port: int


@contextlib.asynccontextmanager
async def run_gateway(
    root: Path, https_port: int | None = None, mqtt_port: int | None = None
) -> AsyncIterator[RunningGateway]:
    """Start every part of the gateway; stop them in reverse order on exit."""
    gateway = Gateway.open(root)
    settings = gateway.settings
    state = gateway.state
    files = raise_open_file_limit(settings.max_connections)
    if files.warning:
        log.warning("%s", files.warning)
    https_ctx = server_context(state.server_cert, state.server_key, state.ca_cert)
    mqtt_ctx = server_context(
        state.server_cert,
        state.server_key,
        state.ca_cert,
        require_client_cert=settings.require_client_cert,
    )
    runner = web.AppRunner(
        build_app(gateway),
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        # Also bounds a client that never finishes its headers (slowloris).
        keepalive_timeout=settings.http_idle_timeout,
    )
    await runner.setup()
    watcher: asyncio.Task[None] | None = None
    collector: asyncio.Task[None] | None = None
    if settings.gc_full_interval > 0:
        policy = FullCollectionPolicy(interval=settings.gc_full_interval)
        collector = asyncio.create_task(run_collector(policy), name="gc-schedule")
    sessions: SessionStore | None = None
    try:
        sessions = SessionStore.open(state.mqtt_sessions)
        port = settings.https_port if https_port is None else https_port
        site = _HttpsSite(
            runner,
            settings.bind,
            port,
            ssl_context=https_ctx,
            backlog=LISTEN_BACKLOG,
            handshake_timeout=settings.tls_handshake_timeout,
        )
        await site.start()
        bound_https = int(runner.addresses[0][1])
        snapshot = gateway.snapshot
        async with SecureBroker(
            ssl_context=mqtt_ctx,
            verifier=gateway.verifier,
            host=settings.bind,
            port=settings.mqtt_port if mqtt_port is None else mqtt_port,
            limits=BrokerLimits(
                max_packet_size=settings.max_packet_size,
                max_connections=settings.max_connections,
                max_offline_queue=settings.mqtt_offline_queue,
                slow_subscriber_timeout=settings.mqtt_slow_subscriber_timeout,
                tls_handshake_timeout=settings.tls_handshake_timeout,
                backlog=LISTEN_BACKLOG,
            ),
            deny_action=settings.deny_action,
            registry=gateway.metrics.registry,
            clock=gateway.clock,
            revoked=snapshot.revoked_devices,
            retired_kids=snapshot.retired_kids,
            session_store=sessions,
        ) as mqtt:
            gateway.mqtt_port = mqtt.port
            gateway.on_change(lambda old, new: _push_to_broker(mqtt, old, new))
            watcher = asyncio.create_task(gateway.watch(), name="registry-watcher")
            state.write_endpoints(bound_https, mqtt.port)
            log.info("gateway ready: https %d, mqtt %d", bound_https, mqtt.port)
            try:
                yield RunningGateway(gateway, bound_https, mqtt.port)
            finally:
                state.remove_endpoints()
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
    finally:
        await runner.cleanup()
        if sessions is not None:
            sessions.close()
        gateway.close()
        if collector is not None:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector


class _HttpsSite(web.TCPSite):
    """aiohttp's TCP site, except that a TLS handshake must finish within
    `handshake_timeout` (asyncio's default is 60 s: a client that connects and sends
    nothing would hold a descriptor that long, before any HTTP timeout applies)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        backlog: int,
        handshake_timeout: float,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=backlog)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        """`TCPSite.start` (aiohttp 3.14) with `ssl_handshake_timeout` added."""
        self._runner._reg_site(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]


def _push_to_broker(mqtt: SecureBroker, old: Snapshot, new: Snapshot) -> None:
    if new.revoked_devices != old.revoked_devices:
        mqtt.set_revoked(new.revoked_devices)
    for kid in new.retired_kids - old.retired_kids:
        mqtt.retire_kid(kid)


async def serve(root: Path, https_port: int | None, mqtt_port: int | None) -> None:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with run_gateway(root, https_port, mqtt_port):
        await stop.wait()
        log.info("stopping")
