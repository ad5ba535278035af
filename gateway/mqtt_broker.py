"""The MQTT listener: TLS, token-checked CONNECT, ACL on every PUBLISH and SUBSCRIBE, on amqtt.

Owns: the whole amqtt integration. `SecureBroker` serves connections itself
(`asyncio.start_server` with our SSLContext and a large backlog), reads and decides
each CONNECT with `gateway.mqtt_policy` *before* amqtt sees the connection, and only
then hands it to amqtt's `external` listener. It closes live sessions at `exp`, on
revocation and on key retirement, and keeps the metrics. With a `session_store`
(`gateway.mqtt_sessions.SessionStore`) it also keeps persistent sessions across a
restart: it restores them at start and tells the store what changed.
Must not: decide policy (that is `gateway.mqtt_policy`; what a stored session keeps is
`gateway.mqtt_sessions`), read tokens or keys from disk, or be imported by the agent.

amqtt 0.12.1 is extended in this module only, by two fenced subclasses (the handler
holds the per-packet holes, so a Broker subclass alone cannot close them). Each
override names the hole it closes and has a regression test in
`tests/test_mqtt_broker.py`:

    _GatepassAmqtt(Broker)
      _initialize_client_session   session built from our checked CONNECT; a resumed
                                   session gets the new connection's TLS identity,
                                   credentials and grant (amqtt kept the old ssl_object),
                                   and keeps only the subscriptions and in-flight
                                   messages that grant allows; clean_session=1, or a
                                   clean session left over, starts from nothing
      _authenticate                true only for a connection admitted by mqtt_policy
      _handle_client_session       scale: amqtt's own, but on CONNECT retained messages
                                   are looked up for the session's own filters, not
                                   every filter in the broker
      _del_all_subscriptions       scale: only the session's own filters are visited
      _subscriptions               a `gateway.mqtt_subscriptions.SubscriptionTable`:
                                   indexed by topic (`hand_off` no longer tests every
                                   filter per PUBLISH) and by client
      _topic_filtering             SUBSCRIBE and delivery checked against the grant
      _publish_retained_messages_for_subscription
                                   retained messages only for the session's own
                                   filters and only topics its ACL allows
      _retain_broadcast_message    bounded offline queue, oldest dropped first; QoS 1
                                   for a persistent session also written to the store
      _publish_session_retained_messages
                                   the offline queue is sent without RETAIN, checked
                                   against the new grant, by `deliver` (PUBACK deletes
                                   the stored copy)
      add_subscription             a granted SUBSCRIBE is stored before its SUBACK, and
                                   replaces the QoS of the same filter [MQTT-3.8.4-3]
      _handle_unsubscription       an UNSUBSCRIBE is stored before its UNSUBACK
      restore, forget_offline (new) a stored session back as an offline amqtt session;
                                   dropped at idle expiry
      hand_off (new)               a QoS 0/1 PUBLISH reaches every subscriber before
                                   its PUBACK (amqtt queued it and PUBACKed at once)
    _GatepassHandler(BrokerProtocolHandler)
      handle_publish               ACL and expiry checked before PUBACK; refused
                                   PUBLISH gets no PUBACK (deny_action decides close);
                                   PUBACK only after `hand_off`
      deliver (new)                write one PUBLISH now, QoS 1 kept in `inflight_out`
      handle_read_timeout          keep-alive: close after 1.5 x keep-alive (will sent)
      _handle_qos1_message_flow    outgoing QoS 1 stays in flight until PUBACK or
                                   disconnect, then is resent on resume (issue 401)
      _retry_deliveries            the resends of a resumed session wait for their
                                   PUBACK without amqtt's 10 s limit, in the
                                   background, and their outcome is retrieved

Delivery and durability. amqtt PUBACKs a QoS 1 PUBLISH once it sits in an in-memory
queue, before any subscriber has it: a gateway killed then loses messages the
publisher has already deleted from its outbox. Here a QoS 0/1 PUBLISH skips amqtt's
queues: `hand_off` writes it to the transport of every connected matching subscriber
(QoS 1: also kept in that session's `inflight_out` until the subscriber's PUBACK,
resent on resume), queues it for every offline persistent session, and only then is
the PUBACK sent. So a message acknowledged to its publisher survives a SIGKILL of the
gateway for every subscriber that was online. With a session store, persistent
sessions (grant, subscriptions, expiry) survive it too, and so do the QoS 1 messages
queued for them while offline (written before the PUBACK) and those still awaiting
a PUBACK when their subscriber disconnected (written at the disconnect). Online
delivery writes nothing per message. What is still NOT durable:
  * without a store: every session and everything queued for it;
  * with one: QoS 1 messages in flight to a subscriber whose disconnect the gateway
    had not yet processed when it died, queued QoS 2 (sent as QoS 1) and QoS 0
    messages, and retained messages;
  * bytes written but not yet taken by the kernel: when a subscriber lags, up to its
    transport's write-buffer high-water mark (64 KiB by default) may be in process
    memory when the PUBACK goes out (the hand-off drains each transport below that
    mark first, so a slow subscriber slows its publishers: back-pressure, for at most
    `slow_subscriber_timeout`, after which that subscriber is disconnected);
  * QoS 2 PUBLISHes keep amqtt's own flow (no device uses QoS 2).
amqtt's MESSAGE_RECEIVED / MESSAGE_BROADCAST plugin events are not fired for QoS 0/1
(this broker runs no amqtt plugins).

Limits and overflow policy (`BrokerLimits`): packets over `max_packet_size` close the
connection, and so does any packet after CONNECT that breaks MQTT 3.1.1's encoding rules
(`gateway.mqtt_packets`: wildcards in a PUBLISH topic, QoS 3, reserved flags, packet id 0,
bad UTF-8, an empty SUBSCRIBE, a second CONNECT...), before amqtt parses it;
connections beyond `max_connections` or faster than `connect_rate` get CONNACK 3; at
most `max_incoming_queue` PUBLISHes of one session are being handed off at once (QoS 0
beyond it is dropped and counted, QoS 1 waits, so PUBACK is delayed: back-pressure); a
persistent session's offline queue holds `max_offline_queue` (oldest dropped, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from amqtt.adapters import BufferReader, ReaderAdapter, WriterAdapter
from amqtt.broker import AMQTT_MAGIC_VALUE_RET_SUBSCRIBED, Broker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, BrokerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import UNACCEPTABLE_PROTOCOL_VERSION, ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.plugins.manager import PluginManager
from amqtt.session import OUTGOING, OutgoingApplicationMessage, Session
from prometheus_client import CollectorRegistry
from transitions import MachineError

from gateway.mqtt_metrics import MqttMetrics
from gateway.mqtt_packets import protocol_violation
from gateway.mqtt_policy import (
    CLOSE_POLICY,
    CONNACK_NOT_AUTHORIZED,
    CONNACK_SERVER_UNAVAILABLE,
    CloseReason,
    ConnectRateLimiter,
    ConnectRefused,
    ConnectRequest,
    DenyAction,
    PublishRefused,
    RefusalReason,
    SessionIndex,
    SessionState,
    SubscribeRefused,
    admit,
    check_publish,
    check_receive,
    check_subscribe,
)
from gateway.mqtt_sessions import (
    QueuedWrite,
    SessionStore,
    SessionStoreError,
    StoredSession,
    Subscription,
    is_durable,
    regrant,
    restored_state,
)
from gateway.mqtt_subscriptions import SubscriptionTable
from shared.errors import AccessDenied
from shared.pki import x5t_s256
from shared.tokens import TokenVerifier

__all__ = ["BrokerLimits", "SecureBroker"]

_log = logging.getLogger(__name__)

LISTENER_NAME: Final = "default"
KEEPALIVE_FACTOR: Final = 1.5
"""MQTT 3.1.1 section 3.1.2.10: close after one and a half keep-alive periods."""
EXPIRY_TICK_SECONDS: Final = 0.1
TAKEOVER_WAIT_SECONDS: Final = 5.0
_STATE_KEY: Final = "gatepass.session"
_ROWS_KEY: Final = "gatepass.stored_rows"
"""session.attributes: packet id -> store row of an in-flight message that is on disk."""
_FLOOD_REFUSALS: Final = frozenset((RefusalReason.rate_limited, RefusalReason.too_many_connections))
"""Refusals that are counted but not logged: each would come with thousands more."""
SESSION_SWEEP_SECONDS: Final = 60.0
"""How often offline sessions past their idle expiry are forgotten (with a store)."""
_NOISY_LOGGERS: Final = ("amqtt", "transitions")
_CONNECT_PACKET: Final = 0x10
_MAX_LENGTH_BYTES: Final = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerLimits:
    """Resource limits of the listener; see the module docstring for overflow policy."""

    max_packet_size: int = 256 * 1024
    max_connections: int = 10_000
    connect_rate: float = 1_000.0
    connect_burst: int = 2_000
    connect_timeout: float = 10.0
    tls_handshake_timeout: float = 10.0
    backlog: int = 4096
    max_incoming_queue: int = 1_000
    max_offline_queue: int = 1_000
    slow_subscriber_timeout: float = 10.0

    def __post_init__(self) -> None:
        if min(self.max_packet_size, self.max_connections, self.backlog) < 1:
            raise ValueError("limits must be positive")
        if min(self.max_incoming_queue, self.max_offline_queue) < 1:
            raise ValueError("queue bounds must be positive")
        if not self.slow_subscriber_timeout > 0:
            raise ValueError("slow_subscriber_timeout must be positive")


T = TypeVar("T")


class _IterationBatch(Generic[T]):
    """What one event-loop iteration gathers, handed to `flush_items` together at its end.

    One store transaction (one sync) per batch instead of one per item: the more the
    broker has to do in an iteration, the larger its batches.
    """

    __slots__ = ("_flush_items", "_items")

    def __init__(self, flush_items: Callable[[list[T]], None]) -> None:
        self._flush_items = flush_items
        self._items: list[T] = []

    def add(self, item: T) -> None:
        if not self._items:
            asyncio.get_running_loop().call_soon(self.flush)
        self._items.append(item)

    def flush(self) -> None:
        """Hand over what was gathered now (also at shutdown); a no-op when empty."""
        items, self._items = self._items, []
        if items:
            self._flush_items(items)


@dataclass(slots=True)
class _Queued:
    """A message in an offline session's queue; `row` names its copy in the store.

    `row` is set once the copy is committed. A message delivered before that (its
    session came back within the same loop iteration) keeps its stored copy after
    the PUBACK: at worst one duplicate after a restart, never a loss.
    """

    topic: str
    data: bytes | bytearray
    qos: int
    row: int | None = None


class _PacketTooLarge(Exception):
    """A packet announced more than max_packet_size bytes (internal signal)."""


class _FramedReader(ReaderAdapter):  # type: ignore[misc]
    """Reads whole MQTT packets (bounded in size) and serves amqtt's small reads from them.

    Every packet amqtt reads (all but the CONNECT, which `SecureBroker` reads itself)
    must be well-formed (`gateway.mqtt_packets`); the first that is not ends the stream
    there, and `violation` says why.
    """

    def __init__(self, reader: asyncio.StreamReader, max_packet_size: int) -> None:
        self._reader = reader
        self._max = max_packet_size
        self._buf = b""
        self._pos = 0
        self.oversize = False
        self.violation: str | None = None

    async def read_packet(self) -> bytes | None:
        """The next whole packet, or None at EOF, on error or when it is too large."""
        reader = self._reader
        try:
            header = bytearray(await reader.readexactly(2))
            length, multiplier, byte = header[1] & 0x7F, 128, header[1]
            while byte & 0x80:
                if len(header) > _MAX_LENGTH_BYTES:
                    self.violation = "remaining length longer than four bytes"
                    return None
                byte = (await reader.readexactly(1))[0]
                header.append(byte)
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
            if len(header) + length > self._max:
                raise _PacketTooLarge
            body = await reader.readexactly(length) if length else b""
        except _PacketTooLarge:
            self.oversize = True
            return None
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return None
        return bytes(header) + body

    async def read(self, n: int = -1) -> bytes:
        out = b""
        while n < 0 or len(out) < n:
            if self._pos >= len(self._buf):
                packet = await self.read_packet()
                if packet is None:
                    return out
                self.violation = protocol_violation(packet)
                if self.violation is not None:
                    return out
                self._buf, self._pos = packet, 0
            end = len(self._buf) if n < 0 else self._pos + n - len(out)
            piece = self._buf[self._pos : end]
            self._pos += len(piece)
            out = piece if not out else out + piece
            if n < 0:
                return out
        return out

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class _TlsWriter(WriterAdapter):  # type: ignore[misc]
    """amqtt's view of one TLS connection, carrying the admission decided before amqtt."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.closed = False
        self.connection: _Connection | None = None
        self.connect_packet: ConnectPacket | None = None

    def write(self, data: bytes) -> None:
        if not self.closed:
            self._writer.write(data)

    async def drain(self) -> None:
        if not self.closed:
            await self._writer.drain()

    def get_peer_info(self) -> tuple[str, int] | None:
        peer = self._writer.get_extra_info("peername")
        if not peer or len(peer) < 2:
            return None
        return str(peer[0]), int(peer[1])

    def get_ssl_info(self) -> ssl.SSLObject | None:
        ssl_object = self._writer.get_extra_info("ssl_object")
        return ssl_object if isinstance(ssl_object, ssl.SSLObject) else None

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()

    def abort(self) -> None:
        self.closed = True
        self._writer.transport.abort()


class _Connection:
    """One admitted connection: its grant, its amqtt session and how it ends."""

    __slots__ = ("broker", "close_reason", "conn_id", "done", "session", "state", "writer")

    def __init__(
        self, broker: SecureBroker, conn_id: int, state: SessionState, writer: _TlsWriter
    ) -> None:
        self.broker = broker
        self.conn_id = conn_id
        self.state = state
        self.writer = writer
        self.session: Session | None = None
        self.close_reason: CloseReason | None = None
        self.done = asyncio.Event()

    def close(self, reason: CloseReason) -> None:
        """End the connection now; the will is published only if CLOSE_POLICY says so."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        if not CLOSE_POLICY[reason].publish_will and self.session is not None:
            self.session.will_flag = False
        self.broker.metrics.sessions_closed.labels(reason=reason.value).inc()
        self.writer.abort()

    def check_publish(self, topic: str) -> None:
        check_publish(self.state, topic, self.broker.clock())

    def publish_refused(self, exc: PublishRefused) -> None:
        self.broker.metrics.publishes_refused.labels(reason=exc.reason.value).inc()
        if exc.reason is RefusalReason.expired:
            self.close(CloseReason.expired)
        elif self.broker.deny_action == "disconnect":
            self.close(CloseReason.acl_violation)


def _state_of(session: Session) -> SessionState | None:
    state = session.attributes.get(_STATE_KEY)
    return state if isinstance(state, SessionState) else None


def _rows_of(session: Session) -> dict[int, int]:
    rows = session.attributes.setdefault(_ROWS_KEY, {})
    assert isinstance(rows, dict)
    return rows


class _GatepassHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """amqtt's per-connection protocol handler with the packet-level holes closed."""

    def __init__(
        self,
        plugins_manager: PluginManager[Any],
        connection: _Connection,
        router: _GatepassAmqtt,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(plugins_manager, loop=loop)
        self._connection = connection
        self._router = router
        self._handing_off = asyncio.Semaphore(connection.broker.limits.max_incoming_queue)
        self._resends: set[asyncio.Task[None]] = set()

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        """Holes: amqtt PUBACKs a PUBLISH before its topic check, and before any
        subscriber has it (a crash then loses an acknowledged message). Check first;
        hand the message to every subscriber; only then PUBACK (see `_GatepassAmqtt.hand_off`).
        """
        topic, data = publish_packet.topic_name, publish_packet.data
        if topic is None or data is None or self.session is None:
            return
        try:
            self._connection.check_publish(topic)
        except PublishRefused as exc:
            self._connection.publish_refused(exc)
            return
        qos = publish_packet.qos or QOS_0
        if qos == QOS_2:  # amqtt's own flow: outside the hand-off promise (module docstring)
            await super().handle_publish(publish_packet)
            return
        if qos == QOS_0 and self._handing_off.locked():
            self._connection.broker.metrics.messages_dropped.labels(queue="incoming").inc()
            return
        async with self._handing_off:
            try:
                await self._router.hand_off(
                    self.session, topic, data, qos, publish_packet.retain_flag
                )
            except SessionStoreError:
                # Not queued for an offline session: no PUBACK; the client resends.
                _log.exception("session store write failed; PUBLISH not acknowledged")
                self._connection.close(CloseReason.shutdown)
                return
        packet_id = publish_packet.packet_id
        if qos == QOS_1 and packet_id is not None:
            await self._send_packet(PubackPacket.build(packet_id))

    def can_deliver(self) -> bool:
        """Whether `deliver` would write now (the session has a connection)."""
        return self.session is not None and isinstance(self.writer, _TlsWriter)

    def deliver(
        self, topic: str, data: bytes | bytearray, qos: int, row: int | None = None
    ) -> _TlsWriter | None:
        """Write one PUBLISH to this subscriber now; a QoS 1 one stays in `inflight_out`
        until its PUBACK (resent on resume if the connection ends first). `row` is its
        copy in the session store, deleted on that PUBACK.

        Returns the writer to drain (back-pressure), or None if there is no connection.
        """
        session, writer = self.session, self.writer
        if session is None or not isinstance(writer, _TlsWriter):  # see can_deliver
            return None
        packet_id = session.next_packet_id if qos else None
        message = OutgoingApplicationMessage(packet_id, topic, qos, data, False)
        packet = message.build_publish_packet()
        message.publish_packet = packet
        if packet_id is not None:
            session.inflight_out[packet_id] = message
            if row is not None:
                _rows_of(session)[packet_id] = row
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._puback_waiters[packet_id] = waiter
            waiter.add_done_callback(functools.partial(self._acknowledged, session, message))
        writer.write(packet.to_bytes())
        return writer

    def _acknowledged(
        self, session: Session, message: OutgoingApplicationMessage, waiter: asyncio.Future[Any]
    ) -> None:
        """PUBACK received: forget the message. Cancelled (connection gone): keep it."""
        packet_id = message.packet_id
        if self._puback_waiters.get(packet_id) is waiter:
            del self._puback_waiters[packet_id]
        if waiter.cancelled():
            return
        message.puback_packet = waiter.result()
        if session.inflight_out.get(packet_id) is message:
            del session.inflight_out[packet_id]
            self._connection.broker.acknowledged(session, packet_id)

    def handle_read_timeout(self) -> None:
        """Hole: amqtt never enforces keep-alive; close (the will is then published)."""
        self._connection.close(CloseReason.keepalive)

    async def _retry_deliveries(self) -> None:
        """Hole: amqtt resends a resumed session's in-flight messages each under a 10 s
        `wait_for` and never retrieves the TimeoutErrors. A subscriber slower than that
        lost the PUBACK wait (the message stayed in flight and went out again on the
        next resume: a duplicate), and every timeout was logged with its traceback when
        collected: 15 % of the gateway's CPU when the subscriber of a 5,000-device
        fleet resumed with thousands in flight. Here each resend waits for its PUBACK
        while connected, as `_handle_qos1_message_flow` does, in the background.
        """
        session = self.session
        if session is None:
            return
        messages = list(
            itertools.chain(session.inflight_in.values(), session.inflight_out.values())
        )
        for message in messages:
            task = asyncio.create_task(self._handle_message_flow(message))
            self._resends.add(task)
            task.add_done_callback(self._resent)
        if messages:
            await asyncio.sleep(0)  # each writes its PUBLISH, in order, before live ones

    def _resent(self, task: asyncio.Task[None]) -> None:
        self._resends.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.debug("resend ended: %r", task.exception())

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        """Hole (amqtt issue 401): keep an unacknowledged outgoing QoS 1 message in flight.

        amqtt drops it after 5 s or when the subscriber disconnects; here it waits for
        the PUBACK while connected and stays in `inflight_out` otherwise, so that
        `_retry_deliveries` resends it (DUP) when the session resumes.
        """
        session = self.session
        if app_message.direction != OUTGOING or session is None:
            await super()._handle_qos1_message_flow(app_message)
            return
        packet_id = app_message.packet_id
        session.inflight_out[packet_id] = app_message
        dup = app_message.publish_packet is not None
        packet = app_message.build_publish_packet(dup=dup)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._puback_waiters[packet_id] = waiter
        try:
            await self._send_packet(packet)
            app_message.publish_packet = packet
            app_message.puback_packet = await waiter
        finally:
            self._puback_waiters.pop(packet_id, None)
        session.inflight_out.pop(packet_id, None)
        self._connection.broker.acknowledged(session, packet_id)


def _new_session(
    connect: ConnectPacket,
    connection: _Connection,
    ssl_object: ssl.SSLObject | None,
    limits: BrokerLimits,
) -> Session:
    session = Session()
    session.retained_messages = asyncio.Queue(maxsize=limits.max_offline_queue)
    session.delivered_message_queue = asyncio.Queue(maxsize=limits.max_incoming_queue)
    session.client_id = connection.state.client_id
    session.clean_session = connect.clean_session_flag
    _refresh(session, connect, connection, ssl_object)
    return session


def _refresh(
    session: Session,
    connect: ConnectPacket,
    connection: _Connection,
    ssl_object: ssl.SSLObject | None,
) -> None:
    """Give `session` this connection's identity, credentials, will, keep-alive and grant."""
    peer = connection.writer.get_peer_info() or (None, None)
    session.remote_address, session.remote_port = peer
    session.ssl_object = ssl_object
    session.username = connect.username
    session.password = connect.password
    session.will_flag = connect.will_flag
    session.will_retain = connect.will_retain_flag
    session.will_qos = connect.will_qos
    session.will_topic = connect.will_topic
    session.will_message = connect.will_message
    keep_alive = max(connect.keep_alive, 0)
    session.keep_alive = math.ceil(keep_alive * KEEPALIVE_FACTOR) if keep_alive else 0
    session.attributes[_STATE_KEY] = connection.state
    connection.session = session


class _GatepassAmqtt(Broker):  # type: ignore[misc]
    """amqtt's broker with the session-level holes closed (see the module docstring)."""

    def __init__(self, owner: SecureBroker) -> None:
        config = BrokerConfig(
            listeners={LISTENER_NAME: ListenerConfig(type=ListenerType.EXTERNAL)},
            plugins={},
        )
        super().__init__(config)
        self._owner = owner
        self._subscriptions: SubscriptionTable = SubscriptionTable()

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        """Hole: amqtt looked up (and deleted) sessions before authenticating, and kept a
        resumed session's old `ssl_object`. Only admitted connections get here."""
        if not isinstance(writer, _TlsWriter) or writer.connection is None:
            raise AMQTTError("connection was not admitted by the Gatepass CONNECT check")
        connection, connect = writer.connection, writer.connect_packet
        if connect is None:
            raise AMQTTError("admitted connection lost its CONNECT")
        handler = _GatepassHandler(self.plugins_manager, connection, self, loop=self._loop)
        client_id = connection.state.client_id
        existing = self._sessions.get(client_id, (None, None))[0]
        if connect.clean_session_flag or existing is None or existing.clean_session:
            # A clean session's state ends with its connection [MQTT-3.1.2-6].
            self._owner.forget_session(client_id)
            if existing is not None:
                await self._delete_session(client_id)
            session = _new_session(connect, connection, writer.get_ssl_info(), self._owner.limits)
            session.parent = 0
        else:
            session = existing
            _refresh(session, connect, connection, writer.get_ssl_info())
            self._regrant(session, connection.state)
            session.parent = 1
        if not session.clean_session:
            self._owner.keep_session(connection.state)
        return handler, session

    def _regrant(self, session: Session, state: SessionState) -> None:
        """A resumed session keeps only what its NEW token allows: subscriptions the
        grant no longer covers are dropped (and forgotten), as are messages in flight
        on topics it may no longer receive."""
        client_id = state.client_id
        _, dropped = regrant(sorted(self._subscriptions.filters_of(client_id)), state.acl)
        if dropped:
            self._owner.forget_subscriptions(client_id, dropped)
            for topic_filter in dropped:
                self._del_subscription(topic_filter, session)
                if not self._subscriptions.get(topic_filter, True):
                    del self._subscriptions[topic_filter]
            _log.info("resumed session %r lost %d subscriptions", client_id, len(dropped))
        for packet_id, message in list(session.inflight_out.items()):
            try:
                check_receive(state, message.topic)
            except AccessDenied:
                del session.inflight_out[packet_id]
                self._owner.acknowledged(session, packet_id)
                self._owner.metrics.messages_dropped.labels(queue="regrant").inc()

    def restore(self, stored: StoredSession) -> None:
        """Recreate a stored persistent session as an OFFLINE amqtt session: its grant,
        its subscriptions (so matching PUBLISHes are queued) and its queued messages."""
        handler, session = self.create_offline_session(stored.client_id)
        limits = self._owner.limits
        session.clean_session = False
        session.retained_messages = asyncio.Queue(maxsize=limits.max_offline_queue)
        session.delivered_message_queue = asyncio.Queue(maxsize=limits.max_incoming_queue)
        session.attributes[_STATE_KEY] = restored_state(stored)
        for subscription in stored.subscriptions:
            subscribers = self._subscriptions.setdefault(subscription.topic_filter, [])
            subscribers.append((session, subscription.qos))
        for message in stored.queued:
            item = _Queued(message.topic, message.payload, message.qos, message.row_id)
            self._enqueue(session, item)
        self._sessions[stored.client_id] = (session, handler)

    async def forget_offline(self, client_id: str) -> None:
        """Drop an OFFLINE session (idle expiry); a connected one is left alone."""
        session = self._sessions.get(client_id, (None, None))[0]
        if session is not None and session.transitions.state != "connected":
            await self._delete_session(client_id)

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """A granted SUBSCRIBE of a persistent session is stored before its SUBACK.

        Hole: amqtt 0.12.1 keeps the old QoS when a client subscribes again to a filter
        it holds (and SUBACKs the new one); [MQTT-3.8.4-3] says the new subscription
        replaces the old. A subscription held already at the same QoS is stored
        already (a persistent session's table mirrors the store), so a device that
        subscribes again on every reconnect costs no synced write."""
        topic_filter = subscription[0]
        before = self._held_qos(topic_filter, session)
        granted: int = await super().add_subscription(subscription, session)
        if granted == AMQTT_MAGIC_VALUE_RET_SUBSCRIBED:
            return granted
        entries: list[tuple[Session, int]] = self._subscriptions.get(topic_filter, [])
        for index, (held, _) in enumerate(entries):
            if held is session:
                entries[index] = (session, granted)
        if not session.clean_session and granted != before:
            kept = Subscription(topic_filter=topic_filter, qos=granted)
            self._owner.keep_subscription(session, kept)
        return granted

    def _held_qos(self, topic_filter: str, session: Session) -> int | None:
        return next(
            (qos for s, qos in self._subscriptions.get(topic_filter, []) if s is session), None
        )

    async def _handle_unsubscription(
        self, client_session: Session, handler: BrokerProtocolHandler, waiter: asyncio.Future[Any]
    ) -> None:
        """An UNSUBSCRIBE of a persistent session is stored before its UNSUBACK."""
        if client_session.client_id is not None and not client_session.clean_session:
            self._owner.forget_subscriptions(client_session.client_id, waiter.result().topics)
        await super()._handle_unsubscription(client_session, handler, waiter)

    async def _del_all_subscriptions(self, session: Session) -> None:
        """Scale: amqtt tested every filter in the broker; only the session's own now."""
        for topic_filter in self._subscriptions.filters_of(session.client_id):
            self._del_subscription(topic_filter, session)
            if not self._subscriptions.get(topic_filter, True):
                del self._subscriptions[topic_filter]

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        """Scale: amqtt 0.12.1's own, except that on CONNECT it offered retained messages
        for every filter in the broker (one await per filter, per connection); now for
        the session's own filters only."""
        authenticated = await self._authenticate(
            client_session, self.listeners_config[listener_name]
        )
        if client_session.client_id is None:
            raise BrokerError("Client ID was not correctly created/set.")
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    old_session = self._sessions[client_session.client_id]
                    await old_session[1].handle_connection_closed()
                    await old_session[1].stop()
                    break
                await asyncio.sleep(1)
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(authenticated)
        if not authenticated:
            await writer.close()
            return
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED,
            client_id=client_session.client_id,
            client_session=client_session,
        )
        await handler.start()
        await self._publish_session_retained_messages(client_session)
        for topic_filter in sorted(self._subscriptions.filters_of(client_session.client_id)):
            await self._publish_retained_messages_for_subscription(
                (topic_filter, QOS_0), client_session
            )
        await self._client_message_loop(client_session, handler)

    async def _authenticate(self, session: Session, _: ListenerConfig) -> bool:
        """Hole: failed logins stayed in `sessions`; now only admitted sessions arrive."""
        return _state_of(session) is not None

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """SUBSCRIBE against the grant (SUBACK 0x80 if refused); deliveries against the ACL."""
        state = _state_of(session)
        if state is None:
            return False
        if action == Action.SUBSCRIBE:
            try:
                check_subscribe(state, topic, self._owner.clock())
            except SubscribeRefused as exc:
                self._owner.metrics.subscribes_refused.labels(reason=exc.reason.value).inc()
                return False
            return True
        try:
            if action == Action.PUBLISH:
                state.acl.check_publish(topic)
            else:
                check_receive(state, topic)
        except AccessDenied:
            return False
        return True

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Hole: on CONNECT amqtt sent retained messages for every client's filters."""
        topic_filter, qos = subscription
        state = _state_of(session)
        if state is None or not self._subscriptions.subscribed(session.client_id, topic_filter):
            return
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            try:
                check_receive(state, topic)
            except AccessDenied:
                continue
            retained_qos = min(qos, retained.qos or qos)
            publish = handler.mqtt_publish(retained.topic, retained.data, retained_qos, retain=True)
            tasks.append(asyncio.ensure_future(publish))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        """Hole: unbounded offline queue; drop the oldest message when it is full.

        A QoS 1 message for a persistent session is also written to the session
        store (before the publisher's PUBACK), bounded the same way.
        """
        topic, data = broadcast["topic"], broadcast["data"]
        item = _Queued(topic, data, qos)
        self._enqueue(target_session, item)  # in publish order, before the commit's await
        item.row = await self._owner.store_queued(target_session, topic, data, qos)

    def _enqueue(self, session: Session, item: _Queued) -> None:
        queue: asyncio.Queue[_Queued] = session.retained_messages
        if queue.full():
            queue.get_nowait()
            self._owner.metrics.messages_dropped.labels(queue="offline").inc()
        queue.put_nowait(item)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Hole: amqtt sent the offline queue with the RETAIN flag set, without the
        ACL, and kept no link to a stored copy. Here each queued message the NEW
        grant still allows is delivered like a live one (`deliver`, QoS 2 as QoS 1);
        its stored copy is deleted on PUBACK; a refused one is dropped and forgotten."""
        handler, state = self._get_handler(session), _state_of(session)
        if not isinstance(handler, _GatepassHandler) or state is None:
            return
        queue: asyncio.Queue[_Queued] = session.retained_messages
        # Stop while the rest is still in order when the connection goes (re-queueing an
        # item at the back would reorder it behind later messages).
        while not queue.empty() and handler.can_deliver():
            item = queue.get_nowait()
            try:
                check_receive(state, item.topic)
            except AccessDenied:
                self._owner.metrics.messages_dropped.labels(queue="regrant").inc()
                self._owner.delivered(item.row)
                continue
            writer = handler.deliver(item.topic, item.data, min(item.qos, QOS_1), item.row)
            assert writer is not None  # can_deliver() said so, and nothing was awaited since
            await self._drain(writer)

    async def hand_off(
        self, source: Session, topic: str, data: bytes | bytearray, qos: int, retain: bool
    ) -> None:
        """Hole: amqtt queued a PUBLISH for a later broadcast and PUBACKed it at once.

        Here the message is, before this returns, written to every connected matching
        subscriber (QoS 1: in its `inflight_out` too), queued for every offline
        persistent session, and retained if asked; the transports are then drained
        (back-pressure from slow subscribers reaches the publisher as a later PUBACK).
        Delivered at min(publish QoS, subscription QoS) (MQTT-3.8.4-6).
        """
        writers: list[_TlsWriter] = []
        for target, target_qos in self._targets(topic, qos):
            if target.transitions.state == "connected":
                handler = self._get_handler(target)
                if isinstance(handler, _GatepassHandler):
                    writer = handler.deliver(topic, data, target_qos)
                    if writer is not None:
                        writers.append(writer)
            elif not target.clean_session and target_qos > QOS_0:
                broadcast = {"session": source, "topic": topic, "data": data}
                await self._retain_broadcast_message(broadcast, target_qos, target)
        if retain:
            await self.retain_message(source, topic, data, qos)
        for writer in writers:
            await self._drain(writer)

    async def _drain(self, writer: _TlsWriter) -> None:
        """Wait until `writer` takes more; a subscriber that stays full for
        `slow_subscriber_timeout` is closed, so that it cannot hold its publishers'
        PUBACKs for ever (its QoS 1 messages in flight stay with its session)."""
        try:
            async with asyncio.timeout(self._owner.limits.slow_subscriber_timeout):
                await writer.drain()
        except TimeoutError:
            if writer.connection is not None:
                writer.connection.close(CloseReason.slow_subscriber)
        except (ConnectionError, ssl.SSLError):
            pass

    def _targets(self, topic: str, qos: int) -> list[tuple[Session, int]]:
        """(session, delivery QoS) for every subscription matching `topic` that may receive it."""
        targets = []
        for topic_filter in self._subscriptions.matching(topic):
            for target, sub_qos in self._subscriptions[topic_filter]:
                state = _state_of(target)
                if state is None:
                    continue
                try:
                    check_receive(state, topic)
                except AccessDenied:
                    continue
                targets.append((target, min(qos, sub_qos)))
        return targets


def _protocol_level(packet: bytes) -> int | None:
    """Protocol level of a CONNECT packet (4 is MQTT 3.1.1), None if it is not one."""
    if not packet or packet[0] != _CONNECT_PACKET:
        return None
    index = 1
    while packet[index] & 0x80:
        index += 1
    body = packet[index + 1 :]
    if len(body) < 7 or body[0] != 0:
        return None
    name_end = 2 + body[1]
    if name_end >= len(body) or body[2:name_end] not in (b"MQTT", b"MQIsdp"):
        return None
    return body[name_end]


def _thumbprint(writer: asyncio.StreamWriter) -> str | None:
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return x5t_s256(der) if der else None


def _quiet_noisy_loggers() -> None:
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


class SecureBroker:
    """The Gatepass MQTT listener, run in the caller's event loop.

    Use `async with SecureBroker(...) as broker:` or `await start()` / `await stop()`.
    `ssl_context` should come from `gateway.tls.server_context(...,
    require_client_cert=True)`; `verifier` holds the gateway's key set (the gateway
    calls `verifier.replace_keys` on rotation; `retire_kid` also refuses the kid here).
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        verifier: TokenVerifier,
        host: str = "127.0.0.1",
        port: int = 8883,
        limits: BrokerLimits | None = None,
        deny_action: DenyAction = "disconnect",
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        revoked: Iterable[str] = (),
        retired_kids: Iterable[str] = (),
        session_store: SessionStore | None = None,
    ) -> None:
        if deny_action not in ("ignore", "disconnect"):
            raise ValueError("deny_action must be 'ignore' or 'disconnect'")
        self.ssl_context = ssl_context
        self.verifier = verifier
        self.host = host
        self.limits = limits or BrokerLimits()
        self.deny_action: DenyAction = deny_action
        self.metrics = MqttMetrics(registry if registry is not None else CollectorRegistry())
        self.clock = clock
        self._revoked: set[str] = set(revoked)
        self._retired: set[str] = set(retired_kids)
        self._requested_port = port
        self._rate = ConnectRateLimiter(self.limits.connect_rate, self.limits.connect_burst)
        self._index = SessionIndex()
        self._connections: dict[int, _Connection] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._amqtt: _GatepassAmqtt | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._store = session_store
        self._delivered = _IterationBatch[int](self._delete_delivered)
        self._queued = _IterationBatch[tuple[QueuedWrite, asyncio.Future[int]]](self._commit_queued)
        self._idle_sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> SecureBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start amqtt's core, then listen; raise if either fails (nothing left running)."""
        if self._server is not None:
            raise RuntimeError("broker already started")
        _quiet_noisy_loggers()
        self._amqtt = _GatepassAmqtt(self)
        await self._amqtt.start()
        try:
            self._restore_sessions(self._amqtt)
            self._server = await asyncio.start_server(
                self._serve,
                self.host,
                self._requested_port,
                ssl=self.ssl_context,
                backlog=self.limits.backlog,
                ssl_handshake_timeout=self.limits.tls_handshake_timeout,
                reuse_address=True,
            )
        except BaseException:
            await self._amqtt.shutdown()
            self._amqtt = None
            raise
        self._sweeper = asyncio.create_task(self._close_expired())
        if self._store is not None:
            self._idle_sweeper = asyncio.create_task(self._forget_idle_sessions())

    async def stop(self) -> None:
        """Stop listening, close every session (no wills), stop amqtt. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        sweepers = [task for task in (self._sweeper, self._idle_sweeper) if task is not None]
        for task in sweepers:
            task.cancel()
        await asyncio.gather(*sweepers, return_exceptions=True)
        for connection in list(self._connections.values()):
            connection.close(CloseReason.shutdown)
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=TAKEOVER_WAIT_SECONDS)
        self._delivered.flush()
        if self._amqtt is not None:
            await self._amqtt.shutdown()
            self._amqtt = None
        await server.wait_closed()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("broker not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def live_sessions(self) -> int:
        return len(self._index)

    # -- administration ----------------------------------------------------------

    def revoke_devices(self, device_ids: Iterable[str]) -> int:
        """Refuse these devices from now on and close their live sessions; returns closed."""
        ids = set(device_ids)
        self._revoked |= ids
        return self._close_all(self._index.of_devices(ids), CloseReason.revoked)

    def set_revoked(self, device_ids: Iterable[str]) -> int:
        """Replace the revoked set (e.g. reloaded from the registry); returns closed."""
        self._revoked = set(device_ids)
        return self._close_all(self._index.of_devices(self._revoked), CloseReason.revoked)

    def retire_kid(self, kid: str) -> int:
        """Refuse tokens signed by `kid` and close the sessions they opened; returns closed."""
        self._retired.add(kid)
        return self._close_all(self._index.of_kid(kid), CloseReason.key_retired)

    def _close_all(self, conn_ids: Iterable[int], reason: CloseReason) -> int:
        closed = 0
        for conn_id in conn_ids:
            connection = self._connections.get(conn_id)
            if connection is not None and connection.close_reason is None:
                connection.close(reason)
                closed += 1
        return closed

    async def _close_expired(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_TICK_SECONDS)
            self._close_all(self._index.expired(self.clock()), CloseReason.expired)

    # -- connections -------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        tls_writer = _TlsWriter(writer)
        try:
            await self._serve_connection(
                _FramedReader(reader, self.limits.max_packet_size), writer, tls_writer
            )
        except Exception:  # a broken connection must never take the listener down
            _log.debug("MQTT connection ended with an error", exc_info=True)
        finally:
            tls_writer.abort()
            if task is not None:
                self._handlers.discard(task)

    async def _serve_connection(
        self, framed: _FramedReader, writer: asyncio.StreamWriter, tls_writer: _TlsWriter
    ) -> None:
        try:
            packet = await asyncio.wait_for(framed.read_packet(), self.limits.connect_timeout)
        except TimeoutError:
            return
        if packet is None:
            return
        level = _protocol_level(packet)
        if level is None:
            return  # not a CONNECT: close without a word [MQTT-3.1.0-1]
        if level != 4:
            await self._connack(tls_writer, UNACCEPTABLE_PROTOCOL_VERSION)
            return
        connect = await ConnectPacket.from_stream(BufferReader(packet))
        if connect.variable_header is None or connect.payload is None or connect.reserved_flag:
            return
        try:
            state = self._admit(connect, writer)
        except ConnectRefused as exc:
            self.metrics.connects.labels(outcome="refused", reason=exc.reason.value).inc()
            if exc.reason not in _FLOOD_REFUSALS:
                peer = tls_writer.get_peer_info()
                _log.info(
                    "CONNECT refused: client id %r from %s: %s %r",
                    connect.client_id,
                    peer[0] if peer else "unknown",
                    exc.reason.value,
                    exc.cause,  # repr: the cause may quote what the client sent
                )
            await self._connack(tls_writer, exc.return_code)
            return
        await self._take_over(state.client_id)
        if state.device_id in self._revoked or state.kid in self._retired:
            # Revoked or retired while the previous connection was being taken over.
            reason = (
                RefusalReason.revoked
                if state.device_id in self._revoked
                else (RefusalReason.key_retired)
            )
            self.metrics.connects.labels(outcome="refused", reason=reason.value).inc()
            await self._connack(tls_writer, CONNACK_NOT_AUTHORIZED)
            return
        self.metrics.connects.labels(outcome="accepted", reason="ok").inc()
        await self._run_session(framed, tls_writer, connect, state)

    def _admit(self, connect: ConnectPacket, writer: asyncio.StreamWriter) -> SessionState:
        now = self.clock()
        self._rate.take(now)
        if len(self._connections) >= self.limits.max_connections:
            raise ConnectRefused(
                RefusalReason.too_many_connections,
                return_code=CONNACK_SERVER_UNAVAILABLE,
            )
        request = ConnectRequest(
            client_id="" if connect.payload.client_id_is_random else connect.client_id or "",
            username=connect.username,
            password=connect.password,
            peer_thumbprint=_thumbprint(writer),
            will_topic=connect.will_topic if connect.will_flag else None,
        )
        return admit(
            request,
            verifier=self.verifier,
            revoked=self._revoked,
            retired_kids=self._retired,
            now=now,
        )

    async def _connack(self, tls_writer: _TlsWriter, return_code: int) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await ConnackPacket.build(0, return_code).to_stream(tls_writer)
        await tls_writer.close()

    async def _run_session(
        self,
        framed: _FramedReader,
        tls_writer: _TlsWriter,
        connect: ConnectPacket,
        state: SessionState,
    ) -> None:
        if self._amqtt is None:
            return
        connection = _Connection(self, next(self._ids), state, tls_writer)
        tls_writer.connection, tls_writer.connect_packet = connection, connect
        self._connections[connection.conn_id] = connection
        self._index.add(connection.conn_id, state)
        self.metrics.live_sessions.inc()
        try:
            await self._amqtt.external_connected(framed, tls_writer, LISTENER_NAME)
        finally:
            if framed.oversize:
                connection.close(CloseReason.oversize_packet)
            elif framed.violation is not None:
                _log.info("MQTT protocol violation by %s: %s", state.client_id, framed.violation)
                connection.close(CloseReason.protocol_violation)
            self._index.remove(connection.conn_id)
            del self._connections[connection.conn_id]
            self.metrics.live_sessions.dec()
            self._session_went_offline(connection.session)
            connection.done.set()

    async def _take_over(self, client_id: str) -> None:
        """Close a live connection of the same client and wait until amqtt let it go."""
        for conn_id in self._index.of_client(client_id):
            connection = self._connections.get(conn_id)
            if connection is not None:
                connection.close(CloseReason.takeover)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(connection.done.wait(), TAKEOVER_WAIT_SECONDS)

    # -- persistent sessions (the session store) -----------------------------------
    #
    # Called by the amqtt subclasses. Without a store every method does nothing.
    # Only CONNECT, SUBSCRIBE, UNSUBSCRIBE, disconnect and OFFLINE queueing write;
    # deletes of acknowledged messages are batched once per loop iteration (a late
    # delete only risks a duplicate, which QoS 1 allows).

    def _restore_sessions(self, amqtt: _GatepassAmqtt) -> None:
        if self._store is None:
            return
        restored = self._store.load(self.clock())
        for stored in restored:
            amqtt.restore(stored)
        if restored:
            _log.info("restored %d persistent MQTT sessions", len(restored))

    def keep_session(self, state: SessionState) -> None:
        """A clean_session=0 CONNECT was accepted: store the session and its grant."""
        if self._store is not None:
            self._store.save(state.client_id, state.device_id, state.acl.rules)

    def forget_session(self, client_id: str) -> None:
        """A clean_session=1 CONNECT: the stored session, if any, is gone."""
        if self._store is not None and client_id in self._store:
            self._store.forget(client_id)

    def keep_subscription(self, session: Session, subscription: Subscription) -> None:
        if self._store is not None and session.client_id in self._store:
            self._store.subscribe(session.client_id, subscription)

    def forget_subscriptions(self, client_id: str, topic_filters: Iterable[str]) -> None:
        if self._store is not None and client_id in self._store:
            self._store.unsubscribe(client_id, topic_filters)

    async def store_queued(
        self, session: Session, topic: str, data: bytes | bytearray, qos: int
    ) -> int | None:
        """Write a message queued for an OFFLINE session; its row, or None if not kept.

        Returns once the message is committed. What one loop iteration queued is
        committed together (group commit): one synced write per message made a
        subscriber that was offline under a fleet's traffic stall the whole broker.
        """
        store, client_id = self._store, session.client_id
        if store is None or not is_durable(bool(session.clean_session), qos):
            return None
        if client_id not in store:
            return None
        written: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queued.add(((client_id, topic, bytes(data), qos), written))
        return await written

    def _commit_queued(self, batch: list[tuple[QueuedWrite, asyncio.Future[int]]]) -> None:
        store = self._store
        assert store is not None  # only `store_queued` fills the batch, and only with one
        try:
            rows = store.enqueue_many(
                [message for message, _ in batch], bound=self.limits.max_offline_queue
            )
        except SessionStoreError as exc:
            for _, written in batch:
                if not written.done():
                    written.set_exception(exc)
            return
        for (_, written), row in zip(batch, rows, strict=True):
            if not written.done():
                written.set_result(row)

    def acknowledged(self, session: Session, packet_id: int) -> None:
        """An in-flight message left `inflight_out` for good: drop its stored copy."""
        rows = session.attributes.get(_ROWS_KEY)
        if rows:
            self.delivered(rows.pop(packet_id, None))

    def delivered(self, row: int | None) -> None:
        if row is None or self._store is None:
            return
        self._delivered.add(row)

    def _delete_delivered(self, rows: list[int]) -> None:
        if self._store is not None:
            try:
                self._store.delivered(rows)
            except SessionStoreError:
                _log.exception("session store: %d delivered messages not deleted", len(rows))

    def _session_went_offline(self, session: Session | None) -> None:
        """Start the idle expiry; store QoS 1 messages still awaiting their PUBACK."""
        store = self._store
        if store is None or session is None or session.clean_session:
            return
        client_id = session.client_id
        if client_id not in store:
            return
        rows = _rows_of(session)
        unsaved = [
            (packet_id, message)
            for packet_id, message in session.inflight_out.items()
            if packet_id not in rows and message.qos == QOS_1
        ]
        inflight = [(m.topic, bytes(m.data), m.qos) for _, m in unsaved]
        try:
            saved = store.disconnected(
                client_id, self.clock(), inflight, bound=self.limits.max_offline_queue
            )
        except SessionStoreError:
            _log.exception("session store: offline state of %r not saved", client_id)
            return
        rows.update(zip((packet_id for packet_id, _ in unsaved), saved, strict=True))

    async def _forget_idle_sessions(self) -> None:
        while True:
            await asyncio.sleep(SESSION_SWEEP_SECONDS)
            await self.forget_expired_sessions()

    async def forget_expired_sessions(self) -> list[str]:
        """Forget offline sessions past their idle expiry (run every minute); their ids."""
        if self._store is None or self._amqtt is None:
            return []
        try:
            expired = self._store.expire(self.clock())
        except SessionStoreError:
            _log.exception("session store: idle sessions not expired")
            return []
        for client_id in expired:
            await self._amqtt.forget_offline(client_id)
        return expired
