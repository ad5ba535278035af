"""Store-and-forward: moves messages from the outbox to a connected MQTT link.

Owns the order and the window: the backlog goes out oldest first, at most `window`
messages await their PUBACK at once, a message leaves the outbox only on its PUBACK, and
after a connection ends everything unacknowledged is sent again on the next one (QoS 1
allows duplicates; losses never happen here). It must not connect, reconnect, back off
or fetch tokens: a supervisor calls `Publisher.run(link)` once per established
connection.

The bookkeeping is `SendWindow`, a sans-IO value with no asyncio in it; `Publisher` is
the thin driver that feeds it from the outbox and the link.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.mqtt_link import LinkClosed, NotConnected
from agent.outbox import Outbox, OutboxMessage

__all__ = ["DEFAULT_WINDOW", "Link", "Publisher", "PublisherStats", "SendWindow"]

DEFAULT_WINDOW = 20
"""PUBLISH packets awaiting PUBACK at once (paho's own default in-flight limit)."""


@dataclass(slots=True)
class PublisherStats:
    """Counters over the publisher's life in this process."""

    sent: int = 0
    """PUBLISH packets handed to a link, first sends and resends."""
    resent: int = 0
    """Of `sent`, messages this process had already sent once (possible duplicates)."""
    acked: int = 0
    """PUBACKs received."""
    sessions: int = 0
    """Connections the publisher has run on."""


class SendWindow:
    """Which outbox messages are in flight on the current connection (sans-IO).

    Messages are sent in id order; `after` is the id of the last one sent on this
    connection, `room` how many more may be sent now. `connection_lost` forgets the
    in-flight set so the next connection starts again from the oldest stored message.
    """

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < 1:
            raise ValueError("the window must hold at least one message")
        self.size = size
        self.after = 0
        self._in_flight: set[int] = set()
        self._ever_sent: set[int] = set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def room(self) -> int:
        return self.size - len(self._in_flight)

    def sent(self, msg_id: int) -> bool:
        """Record a send; return True if this message was sent before (a resend)."""
        if msg_id <= self.after:
            raise ValueError(f"message {msg_id} sent out of order (after {self.after})")
        if not self.room:
            raise ValueError("the send window is full")
        self.after = msg_id
        self._in_flight.add(msg_id)
        resend = msg_id in self._ever_sent
        self._ever_sent.add(msg_id)
        return resend

    def acked(self, msg_id: int) -> None:
        """Record a PUBACK: the message is done for good."""
        self._in_flight.discard(msg_id)
        self._ever_sent.discard(msg_id)

    def failed(self, msg_id: int) -> None:
        """Record a send whose connection ended before its PUBACK."""
        self._in_flight.discard(msg_id)

    def connection_lost(self) -> None:
        """Start over from the oldest stored message on the next connection."""
        self._in_flight.clear()
        self.after = 0


class Link(Protocol):
    """What the publisher needs from a connection (`agent.mqtt_link.MqttLink`)."""

    @property
    def disconnected(self) -> asyncio.Future[LinkClosed]: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None]: ...


AckHook = Callable[[OutboxMessage, float], None]
"""Called with the message and the seconds from its (last) send to its PUBACK."""


class Publisher:
    """Drives one outbox onto whatever link is currently connected."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        window: int = DEFAULT_WINDOW,
        on_ack: AckHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox = outbox
        self.stats = PublisherStats()
        self._window = SendWindow(window)
        self._on_ack = on_ack
        self._clock = clock
        self._wake: asyncio.Future[None] | None = None
        self._done: list[tuple[OutboxMessage, float, asyncio.Future[None]]] = []
        self._drained: asyncio.Event | None = None

    # -- producing -----------------------------------------------------------------------

    def enqueue(self, topic: str, payload: bytes, qos: int = 1) -> int:
        """Store a message durably and let `run` send it; return its outbox id."""
        msg_id = self.outbox.put(topic, payload, qos)
        self._poke()
        return msg_id

    def enqueue_telemetry(
        self, topic: str, build_payload: Callable[[int], bytes], qos: int = 1
    ) -> tuple[int, int]:
        """Store the next telemetry reading (see `Outbox.put_telemetry`); ``(seq, id)``."""
        result = self.outbox.put_telemetry(topic, build_payload, qos)
        self._poke()
        return result

    async def wait_drained(self) -> None:
        """Return once the outbox is empty (every message acknowledged or dropped)."""
        while self.outbox.depth():
            if self._drained is None:
                self._drained = asyncio.Event()
            self._drained.clear()
            await self._drained.wait()

    # -- sending -------------------------------------------------------------------------

    async def run(self, link: Link) -> LinkClosed:
        """Send the backlog and new messages on `link` until that connection ends.

        Returns why it ended. Unacknowledged messages stay in the outbox and go out
        again, in order, on the next `run`. Cancelling `run` is safe at any point.
        """
        if self._wake is not None:
            raise RuntimeError("Publisher.run is already running")
        closed = link.disconnected
        closed.add_done_callback(self._poke_cb)
        self.stats.sessions += 1
        try:
            while True:
                self._wake = asyncio.get_running_loop().create_future()
                self._settle()
                if closed.done():
                    return closed.result()
                try:
                    self._fill(link)
                except NotConnected:
                    await asyncio.shield(closed)
                    continue
                await self._wake
        finally:
            closed.remove_done_callback(self._poke_cb)
            self._settle()  # PUBACKs that arrived while we were being cancelled
            self._window.connection_lost()
            self._wake = None

    def _fill(self, link: Link) -> None:
        window = self._window
        if not window.room:
            return
        for msg in self.outbox.pending(window.room, after=window.after):
            fut = link.publish(msg.topic, msg.payload, msg.qos)
            if window.sent(msg.msg_id):
                self.stats.resent += 1
            self.stats.sent += 1
            sent_at = self._clock()
            fut.add_done_callback(functools.partial(self._on_publish_done, msg, sent_at))

    def _on_publish_done(
        self, msg: OutboxMessage, sent_at: float, fut: asyncio.Future[None]
    ) -> None:
        self._done.append((msg, sent_at, fut))
        self._poke()

    def _settle(self) -> None:
        """Apply finished publishes: PUBACKs leave the outbox (in one transaction).

        A publish that failed (`ConnectionLost`) just leaves the window; its message
        stays stored and is sent again on the next connection.
        """
        done, self._done = self._done, []
        if not done:
            return
        acked: list[tuple[OutboxMessage, float]] = []
        for msg, sent_at, fut in done:
            if fut.cancelled() or fut.exception() is not None:
                self._window.failed(msg.msg_id)
            else:
                self._window.acked(msg.msg_id)
                acked.append((msg, sent_at))
        if not acked:
            return
        self.outbox.ack_many(msg.msg_id for msg, _ in acked)
        self.stats.acked += len(acked)
        if self._on_ack is not None:
            now = self._clock()
            for msg, sent_at in acked:
                self._on_ack(msg, now - sent_at)
        if self._drained is not None and not self.outbox.depth():
            self._drained.set()

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _poke_cb(self, _: asyncio.Future[LinkClosed]) -> None:
        self._poke()
