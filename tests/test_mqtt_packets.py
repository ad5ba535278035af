"""`gateway.mqtt_packets.protocol_violation`: pure tests, no sockets.

Well-formed packets come from amqtt's own encoders (an independent implementation);
malformed ones are written by hand, each breaking one rule of MQTT 3.1.1.
"""

from __future__ import annotations

import struct

import pytest
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.pingreq import PingReqPacket
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket
from hypothesis import given
from hypothesis import strategies as st

from gateway.mqtt_packets import protocol_violation
from tests.mqtt_wire import packet, publish, subscribe, utf8

WELL_FORMED = {
    "qos 0 publish": PublishPacket.build("devices/a/t", b"x", None, False, 0, False).to_bytes(),
    "qos 1 publish": PublishPacket.build("devices/a/t", b"x", 9, False, 1, False).to_bytes(),
    "qos 1 dup retain": PublishPacket.build("devices/a/t", b"", 9, True, 1, True).to_bytes(),
    "qos 2 publish": PublishPacket.build("a", b"x" * 300, 65535, False, 2, False).to_bytes(),
    "puback": PubackPacket.build(1).to_bytes(),
    "pubrec": PubrecPacket.build(1).to_bytes(),
    "pubrel": PubrelPacket.build(1).to_bytes(),
    "pubcomp": PubcompPacket.build(1).to_bytes(),
    "subscribe": SubscribePacket.build([("a/#", 1), ("+/b", 0), ("#", 2)], 3).to_bytes(),
    "unsubscribe": UnsubscribePacket.build(["a/#", "+/b"], 3).to_bytes(),
    "pingreq": PingReqPacket().to_bytes(),
    "disconnect": DisconnectPacket().to_bytes(),
    "non-ASCII topic": publish("devices/a/température", b"21"),
}


@pytest.mark.parametrize("case", sorted(WELL_FORMED))
def test_well_formed_packets_pass(case: str) -> None:
    assert protocol_violation(WELL_FORMED[case]) is None


MALFORMED = {
    "a second CONNECT from a client": packet(0x10, b"\x00\x04MQTT\x04\x02\x00\x1e\x00\x00"),
    "CONNACK from a client": b"\x20\x02\x00\x00",
    "SUBACK from a client": b"\x90\x03\x00\x01\x00",
    "reserved type 0 from a client": b"\x00\x00",
    "reserved type 15 from a client": b"\xf0\x00",
    "PUBREL with reserved flags 0b0000": packet(0x60, b"\x00\x01"),
    "PUBACK with reserved flags 0b0010": packet(0x42, b"\x00\x01"),
    "SUBSCRIBE with reserved flags 0b0000": subscribe([("a", 0)], first_byte=0x80),
    "PUBLISH with QoS 3": publish("a", b"", qos=3),
    "QoS 0 PUBLISH with the DUP flag": b"\x38" + publish("a", b"")[1:],
    "PUBLISH topic name contains a wildcard character": publish("a/+", b""),
    "PUBLISH topic name is empty": publish("", b"x"),
    "PUBLISH topic name contains U+0000": publish("a\x00", b""),
    "PUBLISH topic is not UTF-8": publish(b"a\xc3", b""),
    "PUBLISH topic runs past the end of the packet": packet(0x30, b"\x00\x09abc"),
    "PUBLISH topic missing": packet(0x30, b"\x00"),
    "PUBLISH with packet identifier 0": publish("a", b"", qos=1, packet_id=0),
    "PUBLISH without a packet identifier": packet(0x32, utf8("a") + b"\x01"),
    "PUBACK with packet identifier 0": packet(0x40, b"\x00\x00"),
    "PUBACK of 3 bytes after its fixed header, not 2": packet(0x40, b"\x00\x01\x00"),
    "PINGREQ of 1 bytes after its fixed header, not 0": packet(0xC0, b"\x00"),
    "SUBSCRIBE without a topic filter": subscribe([]),
    "SUBSCRIBE filter without its QoS byte": packet(0x82, b"\x00\x01" + utf8("a")),
    "SUBSCRIBE asks for QoS byte 0x03": subscribe([("a", 3)]),
    "SUBSCRIBE asks for QoS byte 0x81": subscribe([("a", 0x81)]),
    "SUBSCRIBE '#' must be the whole last level of a topic filter": subscribe([("a/#/b", 0)]),
    "SUBSCRIBE '+' must be a whole level of a topic filter": subscribe([("a/b+", 0)]),
    "SUBSCRIBE filter is not UTF-8": subscribe([(b"\xff", 0)]),
    "SUBSCRIBE with packet identifier 0": packet(0x82, b"\x00\x00" + utf8("a") + b"\x00"),
    "UNSUBSCRIBE without a topic filter": packet(0xA2, struct.pack("!H", 1)),
    "UNSUBSCRIBE topic filter is empty": packet(0xA2, struct.pack("!H", 1) + utf8("")),
}


@pytest.mark.parametrize("reason", sorted(MALFORMED))
def test_each_malformed_packet_is_named(reason: str) -> None:
    assert protocol_violation(MALFORMED[reason]) == reason


_levels = st.text(
    st.characters(exclude_characters="/+#\x00", exclude_categories=["Cs"]), max_size=8
)
_topics = st.lists(_levels, min_size=1, max_size=5).map("/".join).filter(bool)


@given(topic=_topics, payload=st.binary(max_size=64), qos=st.integers(0, 2))
def test_any_valid_publish_passes(topic: str, payload: bytes, qos: int) -> None:
    packet_id = 1 if qos else None
    encoded = PublishPacket.build(topic, payload, packet_id, False, qos, False).to_bytes()
    assert protocol_violation(encoded) is None


@given(data=st.binary(min_size=1, max_size=64))
def test_arbitrary_bodies_never_raise(data: bytes) -> None:
    """Whatever follows a fixed header, the answer is a reason or None, never an exception."""
    for first_byte in range(256):
        result = protocol_violation(bytes([first_byte, len(data) - 1]) + data[1:])
        assert result is None or isinstance(result, str)
