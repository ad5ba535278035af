"""Publisher: the sans-IO window, a fake link, and real amqtt outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt_link import ConnectFailed, ConnectionLost, LinkClosed, MqttLink
from agent.outbox import Outbox
from agent.publisher import Publisher, SendWindow
from tests.amqtt_harness import AmqttBroker, BrokerProcess, CutProxy, Subscriber, wait_until

HOST = "127.0.0.1"
TOPIC = "devices/dev-1/telemetry"
DEADLINE_S = 60.0


def _reading(seq: int) -> bytes:
    return json.dumps({"device_id": "dev-1", "seq": seq}).encode()


def _seqs(payloads: list[bytes]) -> list[int]:
    return [json.loads(p)["seq"] for p in payloads]


# -- SendWindow (no I/O) ------------------------------------------------------------------


def test_window_bounds_orders_and_detects_resends() -> None:
    w = SendWindow(2)
    assert w.room == 2
    assert w.sent(1) is False
    assert w.sent(3) is False
    assert w.room == 0
    with pytest.raises(ValueError, match="full"):
        w.sent(4)
    w.acked(1)
    with pytest.raises(ValueError, match="order"):
        w.sent(2)
    w.connection_lost()
    assert (w.after, w.in_flight) == (0, 0)
    assert w.sent(3) is True  # sent on the previous connection, never acked
    w.failed(3)
    assert w.room == 2


def test_window_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SendWindow(0)


# -- Publisher against a fake link --------------------------------------------------------


@dataclass
class FakeLink:
    """Records publishes; the test decides when each one is acknowledged or lost."""

    disconnected: asyncio.Future[LinkClosed] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    sent: list[tuple[bytes, asyncio.Future[None]]] = field(default_factory=list)
    max_in_flight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    auto_ack: bool = False

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.sent.append((payload, fut))
        self.max_in_flight = max(self.max_in_flight, self.in_flight())
        self.changed.set()
        if self.auto_ack:  # the "broker" answers on a later loop iteration
            loop.call_soon(_resolve, fut)
        return fut

    def in_flight(self) -> int:
        return sum(not f.done() for _, f in self.sent)

    def ack_all(self) -> None:
        for _, fut in self.sent:
            if not fut.done():
                fut.set_result(None)

    def drop(self) -> None:
        for _, fut in self.sent:
            if not fut.done():
                fut.set_exception(ConnectionLost("cut"))
        self.disconnected.set_result(LinkClosed(reason="cut", requested=False, from_broker=False))


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox.open(tmp_path / "outbox.db", 10_000, 1 << 24) as box:
        yield box


async def test_backlog_goes_out_in_order_within_the_window(outbox: Outbox) -> None:
    pub = Publisher(outbox, window=5)
    for _ in range(23):
        pub.enqueue_telemetry(TOPIC, _reading)
    link = FakeLink(auto_ack=True)
    task = asyncio.create_task(pub.run(link))
    await asyncio.wait_for(pub.wait_drained(), 5)
    assert _seqs([p for p, _ in link.sent]) == list(range(1, 24))
    assert link.max_in_flight == 5
    assert (pub.stats.sent, pub.stats.acked, pub.stats.resent) == (23, 23, 0)
    link.drop()
    closed = await asyncio.wait_for(task, 5)
    assert closed.reason == "cut"


async def test_unacked_are_resent_first_on_the_next_connection(outbox: Outbox) -> None:
    acks: list[int] = []
    pub = Publisher(outbox, window=4, on_ack=lambda m, rtt: acks.append(m.msg_id))
    for _ in range(6):
        pub.enqueue_telemetry(TOPIC, _reading)
    first = FakeLink()
    task = asyncio.create_task(pub.run(first))
    await wait_until(lambda: len(first.sent) == 4, first.changed, timeout=5, what="4 sends")
    first.sent[1][1].set_result(None)  # only seq 2 is acknowledged (out of order)
    await wait_until(lambda: len(first.sent) == 5, first.changed, timeout=5, what="refill")
    first.drop()
    await asyncio.wait_for(task, 5)
    assert [_seqs([m.payload])[0] for m in outbox.pending(10)] == [1, 3, 4, 5, 6]

    second = FakeLink()
    task = asyncio.create_task(pub.run(second))
    await wait_until(lambda: len(second.sent) == 4, second.changed, timeout=5, what="resends")
    assert _seqs([p for p, _ in second.sent]) == [1, 3, 4, 5]
    assert pub.stats.resent == 4  # 1, 3, 4, 5 were sent on the first connection too
    second.ack_all()
    await wait_until(lambda: len(second.sent) == 5, second.changed, timeout=5, what="seq 6")
    second.ack_all()
    await asyncio.wait_for(pub.wait_drained(), 5)
    assert _seqs([p for p, _ in second.sent]) == [1, 3, 4, 5, 6]
    second.drop()
    await asyncio.wait_for(task, 5)
    assert len(acks) == 6


async def test_messages_enqueued_while_running_are_sent(outbox: Outbox) -> None:
    pub = Publisher(outbox)
    link = FakeLink()
    task = asyncio.create_task(pub.run(link))
    await asyncio.sleep(0)
    pub.enqueue(TOPIC, b"late")
    await wait_until(lambda: len(link.sent) == 1, link.changed, timeout=5, what="a send")
    link.ack_all()
    await asyncio.wait_for(pub.wait_drained(), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert outbox.depth() == 0


# -- against a real broker ----------------------------------------------------------------


@pytest.fixture
async def broker() -> AsyncIterator[AmqttBroker]:
    b = AmqttBroker()
    await b.start()
    yield b
    await b.stop()


@pytest.fixture
async def subscriber(broker: AmqttBroker) -> AsyncIterator[Subscriber]:
    sub = Subscriber(port=broker.port, topic_filter="devices/+/telemetry")
    sub.start()
    await sub.wait_subscribed()
    yield sub
    sub.stop()


class Supervisor:
    """What the agent's supervisor will do, minimally: connect when allowed, run, repeat."""

    def __init__(self, pub: Publisher, port: Callable[[], int], allowed: asyncio.Event) -> None:
        self.pub = pub
        self.port = port
        self.allowed = allowed
        self.link = MqttLink()
        self.sessions = 0
        self.ended = asyncio.Event()

    async def run(self) -> None:
        while True:
            await self.allowed.wait()
            try:
                await self.link.connect(HOST, self.port(), client_id="dev-1", timeout=10)
            except ConnectFailed:
                continue  # raced with the outage switch; `allowed` gates the retry
            self.sessions += 1
            await self.pub.run(self.link)
            self.ended.set()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _stop(task: asyncio.Task[Any], link: MqttLink) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await link.disconnect()


async def test_all_readings_delivered_through_real_broker(
    tmp_path: Path, broker: AmqttBroker, subscriber: Subscriber
) -> None:
    with Outbox.open(tmp_path / "o.db", 10_000, 1 << 24) as box:
        pub = Publisher(box)
        n = 400
        for _ in range(n):
            pub.enqueue_telemetry(TOPIC, _reading)
        allowed = asyncio.Event()
        allowed.set()
        sup = Supervisor(pub, lambda: broker.port, allowed)
        task = asyncio.create_task(sup.run())
        await asyncio.wait_for(pub.wait_drained(), DEADLINE_S)
        await wait_until(
            lambda: set(_seqs(subscriber.payloads())) >= set(range(1, n + 1)),
            subscriber.changed,
            timeout=DEADLINE_S,
            what="every reading",
        )
        await _stop(task, sup.link)
    assert pub.stats.acked == n


async def test_network_cuts_lose_nothing(
    tmp_path: Path, broker: AmqttBroker, subscriber: Subscriber
) -> None:
    proxy = CutProxy(broker.port)
    await proxy.start()
    n = 900
    with Outbox.open(tmp_path / "o.db", 10_000, 1 << 24) as box:
        pub = Publisher(box)
        allowed = asyncio.Event()
        allowed.set()
        sup = Supervisor(pub, lambda: proxy.port, allowed)
        task = asyncio.create_task(sup.run())
        produced = 0
        for cut_at in (200, 500):
            while produced < cut_at + 100:
                pub.enqueue_telemetry(TOPIC, _reading)
                produced += 1
            await wait_until(
                lambda c=cut_at: len(subscriber.payloads()) >= c,  # type: ignore[misc]
                subscriber.changed,
                timeout=DEADLINE_S,
                what="progress",
            )
            allowed.clear()
            proxy.up = False
            sup.ended.clear()
            proxy.cut()  # mid-stream: PUBLISHes and PUBACKs in flight are lost
            await asyncio.wait_for(sup.ended.wait(), DEADLINE_S)
            proxy.up = True
            allowed.set()
        while produced < n:
            pub.enqueue_telemetry(TOPIC, _reading)
            produced += 1
        await asyncio.wait_for(pub.wait_drained(), DEADLINE_S)
        await wait_until(
            lambda: set(_seqs(subscriber.payloads())) >= set(range(1, n + 1)),
            subscriber.changed,
            timeout=DEADLINE_S,
            what="every reading",
        )
        await _stop(task, sup.link)
    await proxy.close()
    counts = Counter(_seqs(subscriber.payloads()))
    duplicates = sum(c - 1 for c in counts.values())
    print(f"network cuts: {n} readings, {duplicates} duplicates, {pub.stats.resent} resent")
    assert set(counts) == set(range(1, n + 1))
    assert sup.sessions == 3
    assert duplicates <= pub.stats.resent  # duplicates only come from resends


async def test_broker_killed_and_restarted_mid_stream(tmp_path: Path) -> None:
    broker = BrokerProcess()
    await broker.start()
    subscriber = Subscriber(port=broker.port, topic_filter="devices/+/telemetry")
    subscriber.start()
    n = 600
    acked: set[int] = set()
    try:
        await subscriber.wait_subscribed()
        with Outbox.open(tmp_path / "o.db", 10_000, 1 << 24) as box:
            pub = Publisher(box, on_ack=lambda m, rtt: acked.add(json.loads(m.payload)["seq"]))
            for _ in range(n):
                pub.enqueue_telemetry(TOPIC, _reading)
            allowed = asyncio.Event()
            allowed.set()
            sup = Supervisor(pub, lambda: broker.port, allowed)
            task = asyncio.create_task(sup.run())
            await wait_until(
                lambda: len(subscriber.payloads()) >= n // 3,
                subscriber.changed,
                timeout=DEADLINE_S,
                what="a third of the readings",
            )
            allowed.clear()
            await broker.kill()
            await asyncio.wait_for(sup.ended.wait(), DEADLINE_S)
            acked_by_first_broker = set(acked)
            await broker.start()  # same port
            await subscriber.wait_subscribed(DEADLINE_S)  # its own auto-reconnect
            allowed.set()
            await asyncio.wait_for(pub.wait_drained(), DEADLINE_S)
            not_acked_before = set(range(1, n + 1)) - acked_by_first_broker
            await wait_until(
                lambda: set(_seqs(subscriber.payloads())) >= not_acked_before,
                subscriber.changed,
                timeout=DEADLINE_S,
                what="the rest",
            )
            await _stop(task, sup.link)
            assert box.depth() == 0
    finally:
        subscriber.stop()
        await broker.kill()
    counts = Counter(_seqs(subscriber.payloads()))
    lost_in_broker = acked_by_first_broker - set(counts)
    duplicates = sum(c - 1 for c in counts.values())
    print(
        f"broker kill: {n} readings, {len(acked_by_first_broker)} acked before the kill, "
        f"{len(lost_in_broker)} of those lost inside amqtt, {duplicates} duplicates"
    )
    # Everything the agent still owned when the broker died arrived. Messages the dead
    # broker had already acknowledged were its responsibility (amqtt keeps no state across
    # a restart); they are counted above, not hidden.
    assert not_acked_before <= set(counts)
    assert sup.sessions == 2


async def test_agent_restart_resends_from_disk(
    tmp_path: Path, broker: AmqttBroker, subscriber: Subscriber
) -> None:
    path = tmp_path / "o.db"
    n = 1000
    box = Outbox.open(path, 10_000, 1 << 24)
    pub = Publisher(box, window=50)
    for _ in range(n):
        pub.enqueue_telemetry(TOPIC, _reading)
    link = MqttLink()
    await link.connect(HOST, broker.port, client_id="dev-1")
    task = asyncio.create_task(pub.run(link))
    await wait_until(
        lambda: pub.stats.acked >= 60, subscriber.changed, timeout=DEADLINE_S, what="some acks"
    )
    # "crash": the process dies with PUBLISHes in flight and nothing flushed politely
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    link.abort("process killed")
    box.close()

    with Outbox.open(path, 10_000, 1 << 24) as box2:
        assert 0 < box2.depth() < n
        assert box2.last_seq == n
        pub2 = Publisher(box2)
        link2 = MqttLink()
        await link2.connect(HOST, broker.port, client_id="dev-1")
        task2 = asyncio.create_task(pub2.run(link2))
        await asyncio.wait_for(pub2.wait_drained(), DEADLINE_S)
        await wait_until(
            lambda: set(_seqs(subscriber.payloads())) >= set(range(1, n + 1)),
            subscriber.changed,
            timeout=DEADLINE_S,
            what="every reading",
        )
        await _stop(task2, link2)
