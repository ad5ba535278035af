"""Malformed MQTT 3.1.1 packets against the real broker, over real mutual TLS.

A protocol violation closes that one network connection ([MQTT-4.8.0-1]) without a
reply, is never delivered to anyone, and leaves every other client served. The bytes
are written by hand (`RawClient`): no MQTT library would send them.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator

import pytest

from gateway.mqtt_broker import BrokerLimits, SecureBroker
from tests.helpers_mqtt import (
    MqttClient,
    MqttPki,
    device_client,
    entries,
    wait_until,
)
from tests.mqtt_wire import RawClient, connect, packet, publish, subscribe, utf8

TOPIC = "devices/dev-1/telemetry"


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture
def broker_limits() -> BrokerLimits:
    # A CONNECT that never arrives whole is dropped within the tests' close deadline.
    return BrokerLimits(connect_timeout=2.0)


@pytest.fixture
async def watcher(pki: MqttPki, broker: SecureBroker) -> AsyncIterator[MqttClient]:
    """A backend subscribed to every device's topics: sees anything the broker delivers."""
    backend = pki.device("backend")
    acl = entries(("allow", "subscribe", "#"))
    client = device_client(pki, broker.port, backend, token=pki.token(backend, acl=acl))
    await client.connected()
    mid = client.subscribe("#", qos=1)
    await wait_until(lambda: mid in client.suback, what="SUBACK")
    yield client
    await asyncio.to_thread(client.stop)


async def still_serving(pki: MqttPki, broker: SecureBroker, watcher: MqttClient) -> None:
    """A well-behaved device still gets its reading delivered."""
    good = await device_client(pki, broker.port, pki.device("dev-2")).connected()
    marker = f"still serving {len(watcher.messages)}".encode()
    good.publish("devices/dev-2/telemetry", marker, qos=1)
    await wait_until(lambda: marker in watcher.payloads(), what="delivery to the watcher")
    await asyncio.to_thread(good.stop)


# -- before CONNECT -------------------------------------------------------------------

BEFORE_CONNECT = {
    "garbage": b"\x00\x01\x02\x03\xff\xfe" * 8,
    "publish before connect": publish(TOPIC, b"x"),
    "reserved packet type 15": packet(0xF0, b""),
    "remaining length of five bytes": b"\x10\xff\xff\xff\xff\x01",
    "protocol name MQTX": connect("dev-1", "dev-1", "t", protocol=b"MQTX"),
    "reserved connect flag": connect("dev-1", "dev-1", "t", flags=0xC3),
    "password without username": connect("dev-1", None, "t", flags=0x42),
    "client id not UTF-8": connect(b"dev-\xff", "dev-1", "t"),
    "connect announces more than it sends": b"\x10\x64" + utf8("MQTT") + b"\x04",
}


@pytest.mark.parametrize("case", sorted(BEFORE_CONNECT))
async def test_malformed_before_connect_closes_without_a_session(
    pki: MqttPki, broker: SecureBroker, watcher: MqttClient, case: str
) -> None:
    client = await RawClient.open(pki, broker.port, pki.device("dev-1"))
    await client.send(BEFORE_CONNECT[case])
    received = await client.until_closed()
    assert received in (b"", b"\x20\x02\x00\x01", b"\x20\x02\x00\x05"), received
    assert broker.live_sessions == 1  # the watcher only
    await still_serving(pki, broker, watcher)


# -- after CONNECT ------------------------------------------------------------------


AFTER_CONNECT = {
    "second connect": connect("dev-1", "dev-1", "t"),
    "publish to a + filter": publish("devices/dev-1/+", b"wild", qos=1),
    "publish to a # filter": publish("devices/dev-1/#", b"wild", qos=1),
    "publish with qos 3": publish(TOPIC, b"q3", qos=3),
    "publish topic not UTF-8": publish(b"devices/dev-1/\xff", b"bad", qos=1),
    "publish topic with NUL": publish("devices/dev-1/a\x00b", b"nul", qos=1),
    "publish to an empty topic": publish("", b"empty", qos=1),
    "qos 1 publish with packet id 0": publish(TOPIC, b"id0", qos=1, packet_id=0),
    "subscribe with wrong flags": subscribe([("devices/dev-1/commands/#", 1)], first_byte=0x80),
    "subscribe without filters": subscribe([]),
    "subscribe with qos 3": subscribe([("devices/dev-1/commands/#", 3)]),
    "subscribe to a filter not UTF-8": subscribe([(b"devices/dev-1/\xff", 1)]),
    "connack from a client": b"\x20\x02\x00\x00",
    "subscribe to an invalid filter": subscribe([("devices/dev-1/#/x", 1)]),
    "unsubscribe without filters": packet(0xA2, struct.pack("!H", 7)),
    "pubrel with wrong flags": packet(0x60, struct.pack("!H", 7)),
    "puback with packet id 0": packet(0x40, struct.pack("!H", 0)),
    "qos 0 publish with the dup flag": b"\x38" + publish(TOPIC, b"dup")[1:],
    "pingreq with a body": packet(0xC0, b"\x00"),
    "reserved packet type 0": b"\x00\x00",
    "remaining length of five bytes": b"\x30\xff\xff\xff\xff\x01",
}


@pytest.mark.parametrize("case", sorted(AFTER_CONNECT))
async def test_malformed_after_connect_closes_the_connection(
    pki: MqttPki,
    broker: SecureBroker,
    watcher: MqttClient,
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    client = await RawClient.connected(pki, broker.port, pki.device("dev-1"))
    await client.send(AFTER_CONNECT[case])
    received = await client.until_closed()
    assert received == b"", received  # no PUBACK, SUBACK or anything else
    await wait_until(lambda: broker.live_sessions == 1, what="the session to end")
    closed = broker.metrics.registry.get_sample_value(
        "gatepass_mqtt_sessions_closed_total", {"reason": "protocol_violation"}
    )
    assert closed == 1
    await still_serving(pki, broker, watcher)
    assert all(m[0].startswith("devices/dev-2/") for m in watcher.messages), watcher.messages
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
