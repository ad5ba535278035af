"""The RabbitMQ enforcer: closes MQTT sessions RabbitMQ itself would let run on.

Owns: reading MQTT connections from RabbitMQ's management API (`parse_connections`),
the pure decision of which to close and why (`decide`), and the driver that polls and
closes them (`Enforcer`, an async context manager; `run` for the CLI).
Must not: mint or verify tokens, change the registry, or talk MQTT.

Why it exists: RabbitMQ 3.10 checks `exp` only at CONNECT, never closes a session at
`exp`, knows nothing of Gatepass revocations, and lets a valid token of device B
connect with client id `dev-1` (kicking dev-1 off). The enforcer closes, through
`DELETE /api/connections/NAME`, every MQTT connection

    reason      when
    expired     now >= connected_at + token lifetime: the management API does not show
                the token's `exp`, but a token used at `connected_at` expires at the
                latest `token_lifetime` seconds after it (tokens are issued before use)
    revoked     its token's identity (or its client id) is a revoked device
    identity    its client id (or a non-empty username) is not its token's identity

The token's identity is the `user` RabbitMQ shows on the connection's *channels*
(`client_id` of the token, else `sub`); the connection itself shows the MQTT username
as sent. A new connection appears in the API after at most the smallest sample
interval of the management plugin's 'basic' retention policy (5 s by default; the
profile's `rabbitmq.conf` sets 1 s), so with a 500 ms poll a session is closed at most
about 1.6 s after its event, within the 2 s the profile promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self
from urllib.parse import quote

import aiohttp

from gateway.config import GatewaySettings, load_settings
from gateway.errors import GatewayError
from gateway.registry import Registry
from gateway.statedir import StateDir

__all__ = [
    "CLOSE_REASON_HEADER",
    "Enforcer",
    "EnforcerError",
    "ManagementClient",
    "MqttConnection",
    "Reason",
    "Verdict",
    "decide",
    "parse_connections",
    "run",
]

log = logging.getLogger(__name__)

Reason = Literal["expired", "revoked", "identity"]
CLOSE_REASON_HEADER: Final = "X-Reason"
_REQUEST_TIMEOUT: Final = 5.0
_FORGET_CLOSED_AFTER: Final = 30.0
_CONNECTION_COLUMNS: Final = "name,node,user,protocol,client_properties,connected_at"
_CHANNEL_COLUMNS: Final = "user,connection_details"


class EnforcerError(GatewayError):
    """RabbitMQ's management API cannot be used (unreachable, refused, unexpected)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttConnection:
    """One MQTT connection as the management API shows it."""

    name: str
    node: str
    client_id: str
    username: str
    identity: str | None
    """The token's identity (from the connection's channels); None until visible."""
    connected_at: float
    """Unix seconds."""


@dataclass(frozen=True, slots=True)
class Verdict:
    connection: MqttConnection
    reason: Reason


# --- pure ------------------------------------------------------------------------------------


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _identities(channels: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for channel in channels:
        details = channel.get("connection_details")
        user = channel.get("user")
        if isinstance(details, Mapping) and isinstance(user, str):
            found[_str(details.get("name"))] = user
    return found


def parse_connections(
    connections: Iterable[Mapping[str, Any]], channels: Iterable[Mapping[str, Any]]
) -> list[MqttConnection]:
    """MQTT connections from `GET /api/connections` joined with `GET /api/channels`."""
    identities = _identities(channels)
    parsed: list[MqttConnection] = []
    for item in connections:
        if not _str(item.get("protocol")).startswith("MQTT"):
            continue
        props = item.get("client_properties")
        client_id = _str(props.get("client_id")) if isinstance(props, Mapping) else ""
        connected_ms = item.get("connected_at")
        if not isinstance(connected_ms, int | float) or isinstance(connected_ms, bool):
            continue
        name = _str(item.get("name"))
        parsed.append(
            MqttConnection(
                name=name,
                node=_str(item.get("node")),
                client_id=client_id,
                username=_str(item.get("user")),
                identity=identities.get(name),
                connected_at=connected_ms / 1000.0,
            )
        )
    return parsed


def _reason(
    conn: MqttConnection, revoked: frozenset[str], now: float, lifetime: float
) -> Reason | None:
    if conn.identity in revoked or conn.client_id in revoked:
        return "revoked"
    if conn.identity is not None and (
        conn.client_id != conn.identity or (conn.username and conn.username != conn.identity)
    ):
        return "identity"
    if now >= conn.connected_at + lifetime:
        return "expired"
    return None


def decide(
    connections: Iterable[MqttConnection],
    revoked: frozenset[str],
    now: float,
    token_lifetime: float,
) -> list[Verdict]:
    """Every connection to close, with the first reason that applies to it."""
    verdicts: list[Verdict] = []
    for conn in connections:
        reason = _reason(conn, revoked, now, token_lifetime)
        if reason is not None:
            verdicts.append(Verdict(conn, reason))
    return verdicts


# --- I/O -------------------------------------------------------------------------------------


class ManagementClient:
    """The few calls of RabbitMQ's management HTTP API the enforcer needs."""

    def __init__(self, base_url: str, user: str, password: str) -> None:
        self._base = base_url.rstrip("/")
        self._auth = aiohttp.BasicAuth(user, password)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT)
        self._session = aiohttp.ClientSession(auth=self._auth, timeout=timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ManagementClient used outside 'async with'")
        return self._session

    async def _get_list(self, path: str) -> list[Mapping[str, Any]]:
        try:
            async with self._http().get(f"{self._base}{path}") as response:
                if response.status != 200:
                    raise EnforcerError(f"GET {path}: HTTP {response.status}")
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise EnforcerError(f"GET {path}: {exc!r}") from exc
        if not isinstance(body, list):
            raise EnforcerError(f"GET {path}: not a JSON list")
        return [item for item in body if isinstance(item, Mapping)]

    async def mqtt_connections(self) -> list[MqttConnection]:
        connections = await self._get_list(f"/api/connections?columns={_CONNECTION_COLUMNS}")
        channels = (
            await self._get_list(f"/api/channels?columns={_CHANNEL_COLUMNS}") if connections else []
        )
        return parse_connections(connections, channels)

    async def close(self, name: str, reason: str) -> bool:
        """Close a connection; False if it was already gone."""
        path = f"/api/connections/{quote(name, safe='')}"
        try:
            headers = {CLOSE_REASON_HEADER: reason}
            async with self._http().delete(f"{self._base}{path}", headers=headers) as response:
                if response.status == 404:
                    return False
                if response.status not in (200, 204):
                    raise EnforcerError(f"DELETE {path}: HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EnforcerError(f"DELETE {path}: {exc!r}") from exc
        return True


class Enforcer:
    """Polls RabbitMQ every `interval` s and closes what `decide` says, until exit.

    `revoked` is read from the registry each tick (one indexed SQLite query). A
    management API failure is logged and retried on the next tick; it never stops the
    loop.
    """

    def __init__(
        self,
        client: ManagementClient,
        revoked: Callable[[], frozenset[str]],
        *,
        token_lifetime: float,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._revoked = revoked
        self._lifetime = token_lifetime
        self._interval = interval
        self._clock = clock
        self._recently_closed: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.closed: list[Verdict] = []

    async def __aenter__(self) -> Self:
        await self._client.__aenter__()
        self._task = asyncio.create_task(self._loop(), name="rabbitmq-enforcer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._client.__aexit__(exc_type, exc, tb)

    async def tick(self) -> list[Verdict]:
        """One poll: fetch, decide, close; returns what was closed."""
        connections = await self._client.mqtt_connections()
        now = self._clock()
        if log.isEnabledFor(logging.DEBUG):
            for conn in connections:
                log.debug("seen %r client %r token of %r", conn.name, conn.client_id, conn.identity)
        self._forget(now)
        verdicts = [
            v
            for v in decide(connections, self._revoked(), now, self._lifetime)
            if v.connection.name not in self._recently_closed
        ]
        for verdict in verdicts:
            await self._close(verdict, now)
        return verdicts

    async def _close(self, verdict: Verdict, now: float) -> None:
        conn = verdict.connection
        closed = await self._client.close(conn.name, f"gatepass: {verdict.reason}")
        self._recently_closed[conn.name] = now
        self.closed.append(verdict)
        log.info(
            "closed MQTT connection %r (client %r, token of %r, node %s): %s%s",
            conn.name,
            conn.client_id,
            conn.identity,
            conn.node,
            verdict.reason,
            "" if closed else " (already gone)",
        )

    def _forget(self, now: float) -> None:
        stale = [n for n, t in self._recently_closed.items() if now - t > _FORGET_CLOSED_AFTER]
        for name in stale:
            del self._recently_closed[name]

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except EnforcerError as exc:
                log.warning("rabbitmq enforcer: %s", exc)
            await asyncio.sleep(self._interval)


def _client(settings: GatewaySettings) -> ManagementClient:
    return ManagementClient(
        settings.rabbitmq_management_url,
        settings.rabbitmq_management_user,
        settings.rabbitmq_management_password.get_secret_value(),
    )


async def _serve(root: Path, stop: asyncio.Event) -> None:
    state = StateDir(root)
    state.require_initialized()
    settings = load_settings(state.config)
    with Registry.open(state.database) as registry:
        enforcer = Enforcer(
            _client(settings),
            registry.revoked_device_ids,
            token_lifetime=settings.token_lifetime,
            interval=settings.rabbitmq_enforce_interval_ms / 1000.0,
        )
        async with enforcer:
            log.info("rabbitmq enforcer watching %s", settings.rabbitmq_management_url)
            await stop.wait()


def run(root: Path, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """`gatepass-gateway rabbitmq enforce`: enforce until SIGTERM or SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        await _serve(root, stop)

    asyncio.run(main())
