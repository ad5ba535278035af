"""One MQTT 3.1.1 connection, paho-mqtt driven by the asyncio event loop.

Owns: opening the TCP (and TLS) connection without blocking the loop, the paho client of
that connection, wiring paho's socket callbacks to ``loop.add_reader``/``add_writer``,
calling ``loop_misc`` about once a second, and turning paho's callbacks into futures
(CONNACK, PUBACK, SUBACK) and a `LinkClosed` reason. Any number of links share one loop;
no link starts a thread. It must not retry, back off, persist or fetch tokens: the
publisher and the agent's supervisor above it do that.

Why the socket is opened here. paho's ``connect()`` does a blocking TCP connect and TLS
handshake. Thousands of simulated devices cannot afford that on the loop, and a thread
pool would cap concurrent handshakes at its size and make every connect uncancellable.
So the link connects with ``loop.sock_connect``, runs the TLS handshake itself
(non-blocking ``do_handshake`` woken by the loop), and hands the finished socket to
paho. The hand-over is the one override of a paho internal, ``Client._create_socket``,
fenced in `_HandoffClient` (paho is pinned below 3; a test checks the hook exists). paho
then only frames MQTT over the socket it is given.

Each `connect` makes a fresh paho client, so paho never resends a QoS 1 message on its
own after a reconnect: the outbox is the only source of retries, and every PUBLISH whose
PUBACK did not arrive fails with `ConnectionLost` when its connection ends.

Errors::

    GatepassError
    +-- LinkError                  base of this module's errors
        +-- ConnectFailed          no session: DNS, TCP, TLS or the CONNACK wait failed
        |   +-- ConnectTimeout     ...within the time allowed (also TimeoutError)
        |   +-- ConnectRefused     the broker answered CONNACK with return code `rc` != 0
        +-- ConnectionLost         the connection ended while an operation waited on it
        +-- NotConnected           an operation needs a connected link (local mistake)
        +-- SubscribeRefused       SUBACK granted 0x80 for the filter
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from agent.tls_resumption import SessionSlot
from shared.errors import GatepassError

if TYPE_CHECKING:
    from paho.mqtt.client import ConnectFlags, DisconnectFlags, MQTTMessage, SocketLike
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

__all__ = [
    "ConnectFailed",
    "ConnectRefused",
    "ConnectTimeout",
    "ConnectionLost",
    "InboundMessage",
    "LinkClosed",
    "LinkError",
    "MqttLink",
    "NotConnected",
    "SubscribeRefused",
]

_log = logging.getLogger(__name__)

MISC_INTERVAL_S = 1.0
"""How often paho's ``loop_misc`` (keepalive PINGREQ, PINGRESP timeout) runs per link."""
DISCONNECT_TIMEOUT_S = 5.0
"""How long `MqttLink.disconnect` waits for DISCONNECT to be written before aborting."""
SUBACK_FAILURE = 0x80

# paho's callback API v2 reports an MQTT 3.1.1 CONNACK return code as an MQTT 5 reason
# code with a different number (5 "Not authorized" becomes 135); its name is stable.
_CONNACK_RC_BY_NAME: dict[str, int] = {
    "Success": 0,
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}


class LinkError(GatepassError):
    """Base class of the MQTT link's errors."""


class ConnectFailed(LinkError):
    """No MQTT session was established (network, TLS or protocol failure)."""


class ConnectTimeout(ConnectFailed, TimeoutError):
    """Connecting, the TLS handshake or the wait for CONNACK took too long."""


class ConnectRefused(ConnectFailed):
    """The broker refused the session; `rc` is the MQTT 3.1.1 CONNACK return code."""

    def __init__(self, rc: int) -> None:
        super().__init__(f"CONNACK refused the connection with return code {rc}")
        self.rc = rc


class ConnectionLost(LinkError):
    """The connection ended before the broker answered."""


class NotConnected(LinkError):
    """The link has no established MQTT session."""


class SubscribeRefused(LinkError):
    """The broker answered SUBACK with 0x80 (failure) for the filter."""

    def __init__(self, topic_filter: str, granted: list[int]) -> None:
        super().__init__(f"SUBACK refused {topic_filter!r} (granted {granted})")
        self.topic_filter = topic_filter
        self.granted = granted


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundMessage:
    """A PUBLISH the broker delivered to this link."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkClosed:
    """Why a connection ended: `requested` by us, or not (broker, network, keepalive)."""

    reason: str
    requested: bool
    from_broker: bool


class _HandoffClient(paho.Client):
    """A paho client whose connection uses a socket opened elsewhere.

    This is the only place that depends on paho internals: ``_create_socket`` (called by
    ``reconnect()``) and ``_sock_close`` (closing without a DISCONNECT packet).
    """

    def __init__(self, *, client_id: str, clean_session: bool) -> None:
        super().__init__(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        self._handoff: SocketLike | None = None

    def start_session(self, sock: SocketLike) -> MQTTErrorCode:
        """Adopt a connected (and handshaken) socket and queue CONNECT on it."""
        self._handoff = sock
        try:
            return self.reconnect()
        finally:
            self._handoff = None

    def _create_socket(self) -> SocketLike:
        sock, self._handoff = self._handoff, None
        if sock is None:
            raise ConnectionError("no socket was handed over to paho")
        return sock

    def abort(self) -> None:
        """Close the socket at once, without a DISCONNECT packet or callbacks."""
        self._sock_close()


# -- opening a connection without blocking the loop ------------------------------------


def _literal_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]] | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)


async def _resolve(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[Any, ...]]]:
    literal = _literal_address(host, port)
    if literal is not None:
        return [literal]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, addr) for family, _, _, _, addr in infos]


async def _tcp_connect(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    last: OSError = OSError(f"no address for {host}")
    for family, addr in await _resolve(host, port):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last


async def _wait_fd(fd: int, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _tls_handshake(
    sock: socket.socket, ctx: ssl.SSLContext, host: str, session: ssl.SSLSession | None
) -> ssl.SSLSocket:
    tls = ctx.wrap_socket(
        sock, server_hostname=host, do_handshake_on_connect=False, session=session
    )
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                await _wait_fd(tls.fileno(), write=False)
            except ssl.SSLWantWriteError:
                await _wait_fd(tls.fileno(), write=True)
    except BaseException:
        tls.close()
        raise


async def _open_stream(
    host: str, port: int, tls_context: ssl.SSLContext | None, session: ssl.SSLSession | None
) -> socket.socket | ssl.SSLSocket:
    sock = await _tcp_connect(host, port)
    if tls_context is None:
        return sock
    return await _tls_handshake(sock, tls_context, host, session)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
        # Nobody may be waiting (a publish nobody awaited): mark it retrieved.
        fut.exception()


# -- the link ----------------------------------------------------------------------------


class MqttLink:
    """A reusable MQTT 3.1.1 link: `connect`, then `publish`/`subscribe`, until closed.

    After a connection ends (see `disconnected`), `connect` may be called again; every
    connection gets a fresh paho client. All methods must be called from the event loop
    the link was connected on.
    """

    def __init__(
        self,
        *,
        on_message: Callable[[InboundMessage], None] | None = None,
        misc_interval: float = MISC_INTERVAL_S,
    ) -> None:
        self.on_message = on_message
        self._misc_interval = misc_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: _HandoffClient | None = None
        self._fd = -1
        self._connack: asyncio.Future[bool] | None = None
        self._closed: asyncio.Future[LinkClosed] | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._publishes: dict[int, asyncio.Future[None]] = {}
        self._subscribes: dict[int, asyncio.Future[list[int]]] = {}
        self._closing = False
        self._tls_session = SessionSlot()
        self._tls_server: tuple[str, int] | None = None
        self.resumed = False
        """Whether the current (or last) connection resumed an earlier TLS session."""

    # -- state -------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """True between a successful CONNACK and the end of that connection."""
        connack = self._connack
        return (
            self._client is not None
            and connack is not None
            and connack.done()
            and not connack.cancelled()
            and connack.exception() is None
        )

    @property
    def disconnected(self) -> asyncio.Future[LinkClosed]:
        """Resolves with the reason when the current (or last) connection ends."""
        if self._closed is None:
            raise NotConnected("the link was never connected")
        return self._closed

    @property
    def in_flight(self) -> int:
        """Publishes waiting for their acknowledgement on this connection."""
        return len(self._publishes)

    # -- connecting ----------------------------------------------------------------------

    async def connect(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        clean_session: bool = False,
        keepalive: int = 60,
        timeout: float = 30.0,
    ) -> bool:
        """Open the connection and wait for CONNACK; return the session-present flag.

        Raises `ConnectRefused` (with the return code), `ConnectTimeout` or
        `ConnectFailed`; on any failure nothing stays open.
        """
        if self._client is not None:
            raise RuntimeError("the link is already connected; disconnect first")
        self._loop = asyncio.get_running_loop()
        if self._tls_server != (host, port):
            self._tls_session.forget()  # a session is only for the server that issued it
            self._tls_server = (host, port)
        session = self._tls_session.offer(tls_context) if tls_context is not None else None
        try:
            async with asyncio.timeout(timeout):
                sock = await _open_stream(host, port, tls_context, session)
                self.resumed = isinstance(sock, ssl.SSLSocket) and bool(sock.session_reused)
                connack = self._start(
                    sock, host, port, client_id, clean_session, keepalive, username, password
                )
                return await connack
        except TimeoutError as exc:
            self._abort("connect timed out")
            raise ConnectTimeout(f"no CONNACK from {host}:{port} within {timeout} s") from exc
        except OSError as exc:  # DNS, TCP and TLS (ssl.SSLError) failures
            if isinstance(exc, ssl.SSLError):
                self._tls_session.forget()  # the next handshake is a full one
            self._abort(f"connect failed: {exc}")
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from exc
        except ValueError as exc:  # ssl.CertificateError and invalid client ids
            self._abort(f"connect failed: {exc}")
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from exc
        except BaseException:
            self._abort("connect abandoned")
            raise

    def _start(
        self,
        sock: socket.socket,
        host: str,
        port: int,
        client_id: str,
        clean_session: bool,
        keepalive: int,
        username: str | None,
        password: str | None,
    ) -> asyncio.Future[bool]:
        loop = self._require_loop()
        client = _HandoffClient(client_id=client_id, clean_session=clean_session)
        client.max_inflight_messages_set(0)  # the publisher bounds its own window
        if username is not None:
            client.username_pw_set(username, password)
        self._wire(client)
        self._client = client
        self._closing = False
        self._connack = loop.create_future()
        self._closed = loop.create_future()
        client.connect_async(host, port, keepalive)
        try:
            rc = client.start_session(sock)
        except BaseException:
            if client.socket() is None:  # paho never adopted it
                sock.close()
            raise
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionError(paho.error_string(rc))
        self._misc = loop.call_later(self._misc_interval * random.random(), self._tick, client)
        return self._connack

    def _wire(self, client: _HandoffClient) -> None:
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message

    # -- operations ----------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None]:
        """Queue a PUBLISH now; the returned future resolves on PUBACK (QoS 1).

        For QoS 0 it resolves once the packet is written. It fails with
        `ConnectionLost` if the connection ends first. Calls go out in call order.
        """
        client = self._require_connected()
        info = client.publish(topic, payload, qos)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnected(f"paho refused the publish: {paho.error_string(info.rc)}")
        fut: asyncio.Future[None] = self._require_loop().create_future()
        self._publishes[info.mid] = fut
        return fut

    async def subscribe(self, topic_filter: str, qos: int = 1) -> list[int]:
        """Subscribe and return the granted QoS list; raise `SubscribeRefused` on 0x80."""
        client = self._require_connected()
        rc, mid = client.subscribe(topic_filter, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(f"paho refused the subscribe: {paho.error_string(rc)}")
        fut: asyncio.Future[list[int]] = self._require_loop().create_future()
        self._subscribes[mid] = fut
        granted = await fut
        if any(code >= SUBACK_FAILURE for code in granted):
            raise SubscribeRefused(topic_filter, granted)
        return granted

    async def disconnect(self, timeout: float = DISCONNECT_TIMEOUT_S) -> LinkClosed | None:
        """Send DISCONNECT and wait until the socket is closed; None if not connected."""
        client, closed = self._client, self._closed
        if client is None or closed is None:
            return None
        self._closing = True
        client.disconnect()
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(closed)
        except TimeoutError:
            self._abort("DISCONNECT could not be sent in time")
            return closed.result()

    def abort(self, reason: str = "aborted") -> None:
        """Close the connection at once, without DISCONNECT (the broker sees a loss)."""
        self._abort(reason)

    # -- loop plumbing: paho socket callbacks ----------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        self._fd = sock.fileno()
        self._require_loop().add_reader(self._fd, self._readable, client)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        loop = self._require_loop()
        fd = sock.fileno()
        if fd < 0:
            fd = self._fd
        loop.remove_reader(fd)
        loop.remove_writer(fd)
        if fd == self._fd:
            self._fd = -1

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        self._require_loop().add_writer(sock.fileno(), self._writable, client)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        self._require_loop().remove_writer(sock.fileno())

    def _readable(self, client: paho.Client) -> None:
        try:
            client.loop_read()
            # TLS may hold decrypted packets the socket will never signal again.
            sock = client.socket()
            while isinstance(sock, ssl.SSLSocket) and sock.pending() and client.socket() is sock:
                client.loop_read()
        except Exception as exc:
            _log.exception("MQTT read failed")
            self._abort(f"read failed: {exc}")

    def _writable(self, client: paho.Client) -> None:
        try:
            client.loop_write()
        except Exception as exc:
            _log.exception("MQTT write failed")
            self._abort(f"write failed: {exc}")

    def _tick(self, client: paho.Client) -> None:
        if client is not self._client:
            return
        client.loop_misc()
        if client is self._client:
            self._misc = self._require_loop().call_later(self._misc_interval, self._tick, client)

    # -- paho protocol callbacks -----------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        connack = self._connack
        if client is not self._client or connack is None or connack.done():
            return
        rc = _CONNACK_RC_BY_NAME.get(reason.getName(), reason.value)
        if rc == 0:
            sock = client.socket()
            if isinstance(sock, ssl.SSLSocket):
                self._tls_session.keep(sock)  # the ticket arrived before the CONNACK
            connack.set_result(flags.session_present)
        else:
            _set_exception(connack, ConnectRefused(rc))

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        self._finish(
            LinkClosed(
                reason=str(reason),
                requested=self._closing,
                from_broker=flags.is_disconnect_packet_from_server,
            )
        )

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        fut = self._publishes.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        fut = self._subscribes.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([int(r.value) for r in reasons])

    def _on_message(self, client: paho.Client, userdata: Any, message: MQTTMessage) -> None:
        handler = self.on_message
        if handler is None:
            return
        try:
            inbound = InboundMessage(
                topic=message.topic,
                payload=bytes(message.payload),
                qos=message.qos,
                retain=bool(message.retain),
                dup=bool(message.dup),
            )
            handler(inbound)
        except Exception:
            # The message is still acknowledged: a handler bug must not kill the link.
            _log.exception("on_message handler failed")

    # -- ending a connection ---------------------------------------------------------------

    def _abort(self, reason: str) -> None:
        client = self._client
        if client is None:
            return
        client.abort()  # fires on_socket_close, which unregisters the fd
        self._finish(LinkClosed(reason=reason, requested=self._closing, from_broker=False))

    def _finish(self, closed: LinkClosed) -> None:
        """Settle everything that waited on the connection that just ended."""
        self._client = None
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        lost = ConnectionLost(f"connection closed: {closed.reason}")
        publishes, self._publishes = self._publishes, {}
        subscribes, self._subscribes = self._subscribes, {}
        for pub in publishes.values():
            _set_exception(pub, lost)
        for sub in subscribes.values():
            _set_exception(sub, lost)
        if self._connack is not None and not self._connack.done():
            _set_exception(
                self._connack, ConnectFailed(f"connection closed before CONNACK: {closed.reason}")
            )
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(closed)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise NotConnected("the link was never connected")
        return self._loop

    def _require_connected(self) -> _HandoffClient:
        client = self._client
        if client is None or not self.is_connected:
            raise NotConnected("the link is not connected")
        return client
