"""Tests of `gateway.mqtt_sessions` and of persistent sessions across a gateway restart.

Unit tests use real SQLite files and no sockets. Integration tests run the broker
(in this process, or as `BrokerProcess` so that it can be SIGKILLed and restarted on
the same port with the same store file) with real paho clients over mutual TLS.
They also exercise the overrides of `gateway.mqtt_broker` that keep the store
(`restore`, `add_subscription`, `_handle_unsubscription`, `forget_offline`,
`_publish_session_retained_messages`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.mqtt_broker import SecureBroker
from gateway.mqtt_policy import PublishRefused, SubscribeRefused, check_publish, check_subscribe
from gateway.mqtt_sessions import (
    DEFAULT_IDLE_EXPIRY,
    SessionRetention,
    SessionStore,
    SessionStoreError,
    StoredSession,
    Subscription,
    is_durable,
    regrant,
    restored_state,
)
from shared.acl import AclRule, CompiledAcl
from tests.helpers_mqtt import (
    BrokerProcess,
    Device,
    MqttClient,
    MqttPki,
    device_client,
    entries,
    wait_until,
)

NOW = 1_700_000_000.0
RULES = (
    AclRule(permission="allow", action="subscribe", topic="devices/+/telemetry"),
    AclRule(permission="allow", action="subscribe", topic="devices/+/status"),
)
BACKEND_ACL = entries(
    ("allow", "subscribe", "devices/+/telemetry"), ("allow", "subscribe", "devices/+/status")
)
TELEMETRY_ONLY_ACL = entries(("allow", "subscribe", "devices/+/telemetry"))


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    return SessionStore.open(tmp_path / "mqtt-sessions.db")


def reopen(store: SessionStore) -> SessionStore:
    store.close()
    return SessionStore.open(store.path, retention=store.retention)


def only(sessions: list[StoredSession]) -> StoredSession:
    assert len(sessions) == 1, sessions
    return sessions[0]


# -- rules -------------------------------------------------------------------------


def test_only_qos1_of_persistent_sessions_is_durable() -> None:
    assert is_durable(clean_session=False, qos=1)
    assert not is_durable(clean_session=True, qos=1)
    assert not is_durable(clean_session=False, qos=0)
    assert not is_durable(clean_session=False, qos=2)


def test_regrant_keeps_only_what_the_new_acl_allows() -> None:
    acl = CompiledAcl(RULES[:1])
    kept, dropped = regrant(["devices/+/telemetry", "devices/+/status", "#"], acl)
    assert kept == ("devices/+/telemetry",)
    assert dropped == ("devices/+/status", "#")


def test_restored_state_can_only_receive() -> None:
    stored = StoredSession(client_id="b", device_id="b", rules=RULES, expires_at=NOW)
    state = restored_state(stored)
    state.acl.check_subscribe("devices/x/telemetry")  # receiving: allowed by the old grant
    with pytest.raises(PublishRefused):
        check_publish(state, "devices/x/telemetry", NOW)
    with pytest.raises(SubscribeRefused):
        check_subscribe(state, "devices/+/telemetry", NOW)


def test_values_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        SessionRetention(idle_expiry=0)
    with pytest.raises(ValueError):
        Subscription(topic_filter="a/#", qos=3)
    with pytest.raises(ValueError):
        StoredSession(client_id="", device_id="b", rules=(), expires_at=NOW)


# -- the SQLite store ----------------------------------------------------------------


def test_session_survives_reopen(store: SessionStore) -> None:
    store.save("b", "b", RULES)
    store.subscribe("b", Subscription(topic_filter="devices/+/telemetry", qos=1))
    store.subscribe("b", Subscription(topic_filter="devices/+/status", qos=0))
    store.subscribe("b", Subscription(topic_filter="devices/+/status", qos=1))  # replaced
    first = store.enqueue("b", "devices/d/telemetry", b"1", 1, bound=10)
    store.enqueue("b", "devices/d/status", b"2", 1, bound=10)
    store = reopen(store)
    assert "b" in store and "other" not in store
    session = only(store.load(NOW))
    assert session.device_id == "b"
    assert session.rules == RULES
    assert session.expires_at == NOW + DEFAULT_IDLE_EXPIRY  # online at the crash: now + idle
    assert session.subscriptions == (
        Subscription(topic_filter="devices/+/status", qos=1),
        Subscription(topic_filter="devices/+/telemetry", qos=1),
    )
    assert session.queued[0].row_id == first.row_id
    assert [m.payload for m in session.queued] == [b"1", b"2"]
    store.close()


def test_enqueue_drops_the_oldest_beyond_the_bound(store: SessionStore) -> None:
    store.save("b", "b", RULES)
    store.save("c", "c", RULES)
    store.enqueue("c", "devices/d/telemetry", b"c", 1, bound=2)
    results = [store.enqueue("b", "devices/d/telemetry", b"%d" % i, 1, bound=3) for i in range(5)]
    assert [r.dropped for r in results] == [0, 0, 0, 1, 1]
    sessions = {s.client_id: s for s in store.load(NOW)}
    assert [m.payload for m in sessions["b"].queued] == [b"2", b"3", b"4"]
    assert [m.payload for m in sessions["c"].queued] == [b"c"]  # another session's bound
    store.close()


def test_enqueue_many_is_one_commit_in_order_with_each_bound(store: SessionStore) -> None:
    store.save("b", "b", RULES)
    store.save("c", "c", RULES)
    before = store.commits
    messages = [("b" if i % 2 else "c", "devices/d/telemetry", b"%d" % i, 1) for i in range(10)]
    rows = store.enqueue_many(messages, bound=3)
    assert store.commits == before + 1
    assert rows == sorted(rows) and len(set(rows)) == 10
    assert store.enqueue_many([], bound=3) == [] and store.commits == before + 1
    sessions = {s.client_id: s for s in store.load(NOW)}
    assert [m.payload for m in sessions["b"].queued] == [b"5", b"7", b"9"]
    assert [m.payload for m in sessions["c"].queued] == [b"4", b"6", b"8"]
    store.close()


def test_delivered_messages_are_deleted(store: SessionStore) -> None:
    store.save("b", "b", RULES)
    rows = [store.enqueue("b", "t/x", b"%d" % i, 1, bound=10).row_id for i in range(3)]
    store.delivered([rows[0], rows[2]])
    store.delivered([])
    assert [m.payload for m in only(store.load(NOW)).queued] == [b"1"]
    store.close()


def test_forget_removes_everything(store: SessionStore) -> None:
    store.save("b", "b", RULES)
    store.subscribe("b", Subscription(topic_filter="devices/+/telemetry", qos=1))
    store.enqueue("b", "t/x", b"1", 1, bound=10)
    store.forget("b")
    assert "b" not in store
    store = reopen(store)
    assert store.load(NOW) == []
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM queued").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM subscriptions").fetchone() == (0,)
    store.close()


def test_unsubscribe(store: SessionStore) -> None:
    store.save("b", "b", RULES)
    store.subscribe("b", Subscription(topic_filter="a/#", qos=1))
    store.subscribe("b", Subscription(topic_filter="b/#", qos=1))
    store.unsubscribe("b", ["a/#", "unknown/#"])
    assert only(store.load(NOW)).subscriptions == (Subscription(topic_filter="b/#", qos=1),)
    store.close()


def test_idle_expiry(tmp_path: Path) -> None:
    store = SessionStore.open(tmp_path / "s.db", retention=SessionRetention(idle_expiry=100))
    store.save("gone", "gone", RULES)
    store.save("kept", "kept", RULES)
    store.save("online", "online", RULES)
    store.disconnected("gone", NOW, bound=10)
    store.disconnected("kept", NOW + 50, bound=10)
    assert store.expire(NOW + 99) == []
    assert store.expire(NOW + 100) == ["gone"]
    assert "gone" not in store
    # A resumed session has no expiry while it is online.
    store.save("kept", "kept", RULES)
    assert store.expire(NOW + 10_000) == []
    store.disconnected("kept", NOW + 10_000, bound=10)
    assert [s.client_id for s in store.load(NOW + 10_099)] == ["kept", "online"]
    assert [s.client_id for s in store.load(NOW + 10_100)] == ["online"]
    store.close()


def test_disconnect_keeps_unacknowledged_messages(store: SessionStore) -> None:
    store.save("b", "b", RULES)
    rows = store.disconnected("b", NOW, [("t/1", b"1", 1), ("t/2", b"2", 1)], bound=10)
    assert len(rows) == 2 and rows[0] < rows[1]
    session = only(store.load(NOW))
    assert session.expires_at == NOW + DEFAULT_IDLE_EXPIRY
    assert [m.row_id for m in session.queued] == rows
    assert [m.topic for m in session.queued] == ["t/1", "t/2"]
    store.close()


def test_file_is_private_and_in_wal_mode(store: SessionStore) -> None:
    assert store.path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    store.close()


def test_unusable_files_raise_session_store_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(SessionStoreError):
        SessionStore.open(garbage)
    with pytest.raises(SessionStoreError):
        SessionStore.open(tmp_path / "missing-dir" / "s.db")
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(SessionStoreError):
        SessionStore.open(newer)
    corrupt = SessionStore.open(tmp_path / "corrupt.db")
    corrupt.save("b", "b", RULES)
    with sqlite3.connect(corrupt.path) as conn:
        conn.execute('UPDATE sessions SET acl = \'[{"permission": "maybe"}]\'')
    with pytest.raises(SessionStoreError, match="corrupt"):
        corrupt.load(NOW)
    corrupt.close()


# -- the broker with a store ---------------------------------------------------------


def backend_client(
    pki: MqttPki, port: int, backend: Device, acl: object = BACKEND_ACL, **kwargs: Any
) -> MqttClient:
    token = pki.token(backend, acl=acl)  # type: ignore[arg-type]
    return device_client(pki, port, backend, token=token, clean_session=False, **kwargs)


def stored_rows(path: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    """Read the store file as another process would (the broker may be running)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute(sql, args).fetchall()


def is_offline(path: Path, client_id: str) -> bool:
    rows = stored_rows(path, "SELECT expires_at FROM sessions WHERE client_id = ?", client_id)
    return bool(rows) and rows[0][0] is not None


async def stopped(*clients: MqttClient) -> None:
    await asyncio.gather(*(asyncio.to_thread(c.stop) for c in clients))


async def publish_all(client: MqttClient, topic: str, payloads: list[bytes]) -> None:
    mids = [client.publish(topic, payload, qos=1) for payload in payloads]
    await wait_until(lambda: set(mids) <= client.acked, timeout=20, what="PUBACKs")


async def test_persistent_session_survives_a_gateway_sigkill(pki: MqttPki) -> None:
    # Stock amqtt 0.12.1 (and this broker without a store) forgets every session when
    # its process dies: the subscriber would come back to session_present=0 and miss
    # everything published meanwhile, though each publisher got its PUBACK.
    db = pki.directory / "mqtt-sessions.db"
    broker = BrokerProcess(pki, session_store=db)
    port = await broker.start()
    backend, dev = pki.device("backend"), pki.device("dev-1")
    topic = "devices/dev-1/telemetry"
    before = [b"before-%d" % i for i in range(5)]
    after = [b"after-%d" % i for i in range(50)]
    try:
        sub = await backend_client(pki, port, backend).connected()
        mid = sub.subscribe("devices/+/telemetry", qos=1)
        await wait_until(lambda: mid in sub.suback, what="SUBACK")
        await stopped(sub)
        await wait_until(lambda: is_offline(db, "backend"), what="subscriber offline in store")
        pub = await device_client(pki, port, dev).connected()
        await publish_all(pub, topic, before)  # queued for the offline subscriber
        await broker.kill()
        await wait_until(pub.disconnected.is_set, what="publisher cut off")
        assert await broker.start() == port
        pub = await device_client(pki, port, dev).connected()
        await publish_all(pub, topic, after)  # the subscriber is still away
        sub = await backend_client(pki, port, backend).connected()
        assert sub.session_present is True
        await wait_until(
            lambda: set(sub.payloads()) == set(before + after), timeout=20, what="all messages"
        )
        assert sub.payloads() == before + after  # in order, no duplicates
        assert not any(retain for *_, retain, _dup in sub.messages)
        await wait_until(
            lambda: stored_rows(db, "SELECT COUNT(*) FROM queued") == [(0,)],
            what="acknowledged messages deleted from the store",
        )
        await stopped(sub, pub)
    finally:
        await broker.kill()


async def test_restored_subscription_not_allowed_by_the_new_token_is_dropped(
    pki: MqttPki,
) -> None:
    db = pki.directory / "mqtt-sessions.db"
    broker = BrokerProcess(pki, session_store=db)
    port = await broker.start()
    backend, dev = pki.device("backend"), pki.device("dev-1")
    try:
        sub = await backend_client(pki, port, backend).connected()
        mids = [sub.subscribe(f, qos=1) for f in ("devices/+/telemetry", "devices/+/status")]
        await wait_until(lambda: set(mids) <= set(sub.suback), what="SUBACKs")
        await stopped(sub)
        await wait_until(lambda: is_offline(db, "backend"), what="subscriber offline in store")
        await broker.kill()
        assert await broker.start() == port
        pub = await device_client(pki, port, dev).connected()
        await publish_all(pub, "devices/dev-1/telemetry", [b"t1"])
        await publish_all(pub, "devices/dev-1/status", [b"s1"])  # queued under the old grant
        sub = await backend_client(pki, port, backend, acl=TELEMETRY_ONLY_ACL).connected()
        assert sub.session_present is True
        await wait_until(lambda: sub.payloads() == [b"t1"], what="allowed queued message")
        await publish_all(pub, "devices/dev-1/status", [b"s2"])
        await publish_all(pub, "devices/dev-1/telemetry", [b"t2"])
        await wait_until(lambda: sub.payloads() == [b"t1", b"t2"], what="live delivery")
        filters = stored_rows(db, "SELECT topic_filter FROM subscriptions")
        assert filters == [("devices/+/telemetry",)]
        await stopped(sub, pub)
    finally:
        await broker.kill()


@pytest.fixture
async def stored_broker(pki: MqttPki) -> AsyncIterator[SecureBroker]:
    store = SessionStore.open(pki.directory / "mqtt-sessions.db")
    clock = FakeClock()
    async with SecureBroker(
        ssl_context=pki.server_context(),
        verifier=pki.verifier(),
        port=0,
        registry=CollectorRegistry(),
        session_store=store,
        clock=clock,
    ) as running:
        yield running
    store.close()


class FakeClock:
    """Real time plus an offset a test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def queued_count(db: Path) -> int:
    count = stored_rows(db, "SELECT COUNT(*) FROM queued")[0][0]
    assert isinstance(count, int)
    return count


async def test_online_delivery_writes_nothing_per_message(
    pki: MqttPki, stored_broker: SecureBroker
) -> None:
    db = pki.directory / "mqtt-sessions.db"
    backend, dev = pki.device("backend"), pki.device("dev-1")
    sub = await backend_client(pki, stored_broker.port, backend).connected()
    mid = sub.subscribe("devices/+/telemetry", qos=1)
    await wait_until(lambda: mid in sub.suback)
    pub = await device_client(pki, stored_broker.port, dev).connected()
    payloads = [b"%d" % i for i in range(100)]
    await publish_all(pub, "devices/dev-1/telemetry", payloads)
    await wait_until(lambda: sub.payloads() == payloads, what="delivery")
    assert queued_count(db) == 0
    assert stored_rows(db, "SELECT client_id, expires_at FROM sessions") == [("backend", None)]
    await stopped(sub, pub)


async def test_messages_for_an_offline_session_are_committed_in_groups(
    pki: MqttPki, stored_broker: SecureBroker
) -> None:
    # One synced commit per message queued for an offline subscriber stalled the broker
    # when the subscriber taking a 5,000-device fleet's traffic reconnected.
    store = stored_broker._store
    assert store is not None
    db = pki.directory / "mqtt-sessions.db"
    backend = pki.device("backend")
    sub = await backend_client(pki, stored_broker.port, backend).connected()
    mid = sub.subscribe("devices/+/telemetry", qos=1)
    await wait_until(lambda: mid in sub.suback)
    await stopped(sub)
    await wait_until(lambda: is_offline(db, "backend"), what="subscriber offline in store")
    devices = [pki.device(f"dev-{i}") for i in range(20)]
    pubs = [await device_client(pki, stored_broker.port, d).connected() for d in devices]
    before = store.commits
    sent = {d.device_id: [b"%s-%d" % (d.device_id.encode(), i) for i in range(15)] for d in devices}
    await asyncio.gather(
        *(
            publish_all(pub, f"devices/{d.device_id}/telemetry", sent[d.device_id])
            for pub, d in zip(pubs, devices, strict=True)
        )
    )
    assert queued_count(db) == 300  # every one stored before its PUBACK
    groups = store.commits - before
    assert groups < 300 * 0.8, f"{groups} commits for 300 messages from 20 publishers"
    sub = await backend_client(pki, stored_broker.port, backend).connected()
    everything = {payload for payloads in sent.values() for payload in payloads}
    await wait_until(lambda: set(sub.payloads()) == everything, timeout=20, what="delivery")
    for device_id, payloads in sent.items():  # each publisher's messages in its order
        assert [p for p in sub.payloads() if p.startswith(device_id.encode() + b"-")] == payloads
    await wait_until(lambda: queued_count(db) == 0, what="acknowledged copies deleted")
    await stopped(sub, *pubs)


async def test_unsubscribe_and_clean_session_are_stored(
    pki: MqttPki, stored_broker: SecureBroker
) -> None:
    db = pki.directory / "mqtt-sessions.db"
    backend = pki.device("backend")
    sub = await backend_client(pki, stored_broker.port, backend).connected()
    mids = [sub.subscribe(f, qos=1) for f in ("devices/+/telemetry", "devices/+/status")]
    await wait_until(lambda: set(mids) <= set(sub.suback))
    assert len(stored_rows(db, "SELECT * FROM subscriptions")) == 2
    result, _ = sub.client.unsubscribe("devices/+/status")
    assert result == 0
    await wait_until(
        lambda: (
            stored_rows(db, "SELECT topic_filter FROM subscriptions") == [("devices/+/telemetry",)]
        ),
        what="unsubscribe stored",
    )
    await stopped(sub)
    clean = await device_client(
        pki, stored_broker.port, backend, token=pki.token(backend, acl=BACKEND_ACL)
    ).connected()
    assert clean.session_present is False
    assert stored_rows(db, "SELECT * FROM sessions") == []
    assert stored_rows(db, "SELECT * FROM subscriptions") == []
    await stopped(clean)


async def test_idle_sessions_are_forgotten(pki: MqttPki, stored_broker: SecureBroker) -> None:
    db = pki.directory / "mqtt-sessions.db"
    backend, dev = pki.device("backend"), pki.device("dev-1")
    sub = await backend_client(pki, stored_broker.port, backend).connected()
    mid = sub.subscribe("devices/+/telemetry", qos=1)
    await wait_until(lambda: mid in sub.suback)
    await stopped(sub)
    await wait_until(lambda: is_offline(db, "backend"), what="offline in store")
    pub = await device_client(pki, stored_broker.port, dev).connected()
    await publish_all(pub, "devices/dev-1/telemetry", [b"queued"])
    assert queued_count(db) == 1
    assert await stored_broker.forget_expired_sessions() == []
    clock = stored_broker.clock
    assert isinstance(clock, FakeClock)
    clock.offset = DEFAULT_IDLE_EXPIRY + 1
    assert await stored_broker.forget_expired_sessions() == ["backend"]
    assert stored_rows(db, "SELECT * FROM sessions") == []
    assert queued_count(db) == 0
    assert stored_broker._amqtt is not None
    assert "backend" not in stored_broker._amqtt.sessions
    assert "devices/+/telemetry" not in stored_broker._amqtt.subscriptions
    await stopped(pub)


async def test_unacknowledged_in_flight_messages_survive_a_gateway_sigkill(
    pki: MqttPki,
) -> None:
    # A message delivered to a subscriber that vanished before its PUBACK lived only in
    # `inflight_out`; with a store it is written when the session goes offline.
    db = pki.directory / "mqtt-sessions.db"
    broker = BrokerProcess(pki, session_store=db)
    port = await broker.start()
    backend, dev = pki.device("backend"), pki.device("dev-1")
    try:
        first = await backend_client(pki, port, backend, manual_ack=True).connected()
        mid = first.subscribe("devices/+/telemetry", qos=1)
        await wait_until(lambda: mid in first.suback, what="SUBACK")
        pub = await device_client(pki, port, dev).connected()
        await publish_all(pub, "devices/dev-1/telemetry", [b"unacked"])
        await wait_until(lambda: first.payloads() == [b"unacked"], what="delivery")
        first.drop()  # received, never acknowledged
        await wait_until(lambda: is_offline(db, "backend"), what="subscriber offline in store")
        assert queued_count(db) == 1
        await broker.kill()
        assert await broker.start() == port
        second = await backend_client(pki, port, backend).connected()
        assert second.session_present is True
        await wait_until(lambda: second.payloads() == [b"unacked"], what="redelivery")
        await wait_until(lambda: queued_count(db) == 0, what="deleted on PUBACK")
        await stopped(second)
    finally:
        await broker.kill()


async def test_subscribing_again_on_reconnect_writes_nothing(
    pki: MqttPki, stored_broker: SecureBroker
) -> None:
    # Agents subscribe again on every reconnect (one per token): a synced write each
    # time for a subscription already stored was a third of a reconnect's store cost.
    store = stored_broker._store
    assert store is not None
    db = pki.directory / "mqtt-sessions.db"
    backend = pki.device("backend")
    for qos, writes in ((1, 1), (1, 0), (0, 1)):
        sub = await backend_client(pki, stored_broker.port, backend).connected()
        before = store.commits
        mid = sub.subscribe("devices/+/telemetry", qos=qos)
        await wait_until(lambda sub=sub, mid=mid: mid in sub.suback)  # type: ignore[misc]
        assert store.commits - before == writes, f"SUBSCRIBE at QoS {qos}"
        assert stored_rows(db, "SELECT topic_filter, qos FROM subscriptions") == [
            ("devices/+/telemetry", qos)
        ]
        await stopped(sub)
        await wait_until(lambda: is_offline(db, "backend"), what="subscriber offline in store")
