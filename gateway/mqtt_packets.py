"""Well-formedness of the MQTT 3.1.1 packets a client sends after its CONNECT.

Owns: `protocol_violation`, the encoding rules of MQTT 3.1.1 sections 2 and 3 that
amqtt 0.12.1 does not enforce: which packet types a client may send, their reserved
flag bits, QoS 3, non-zero packet identifiers, strict UTF-8 without U+0000, no
wildcard in a PUBLISH topic, valid filters and requested QoS in SUBSCRIBE, at least one
filter in SUBSCRIBE and UNSUBSCRIBE. Any of them is a protocol violation, and
[MQTT-4.8.0-1] the server closes the network connection.
Must not: decide what a device may do (that is `gateway.mqtt_policy`), or do I/O: it
reads one whole packet that `gateway.mqtt_broker` has already framed and size-checked.
"""

from __future__ import annotations

import struct
from typing import Final

from shared.errors import InvalidTopic
from shared.topics import validate_topic_filter, validate_topic_name

__all__ = ["protocol_violation"]

PUBLISH: Final = 3
SUBSCRIBE: Final = 8
UNSUBSCRIBE: Final = 10

# Packet type -> the fixed header's flag bits [MQTT-2.2.2-1]; PUBLISH's are its own.
_CLIENT_PACKETS: Final[dict[int, int | None]] = {
    PUBLISH: None,
    4: 0b0000,  # PUBACK
    5: 0b0000,  # PUBREC
    6: 0b0010,  # PUBREL
    7: 0b0000,  # PUBCOMP
    SUBSCRIBE: 0b0010,
    UNSUBSCRIBE: 0b0010,
    12: 0b0000,  # PINGREQ
    14: 0b0000,  # DISCONNECT
}
_NAMES: Final = {
    0: "reserved type 0",
    1: "a second CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
    15: "reserved type 15",
}
_ACK_PACKETS: Final = frozenset((4, 5, 6, 7))
_EMPTY_PACKETS: Final = frozenset((12, 14))
_ID: Final = struct.Struct("!H")


class _Violation(Exception):
    """Internal: the reason a packet breaks the protocol."""


def protocol_violation(packet: bytes) -> str | None:
    """Why `packet` (fixed header included) breaks MQTT 3.1.1, or None if it does not."""
    kind, flags = packet[0] >> 4, packet[0] & 0x0F
    name = _NAMES[kind]
    if kind not in _CLIENT_PACKETS:
        return f"{name} from a client"
    expected = _CLIENT_PACKETS[kind]
    if expected is not None and flags != expected:
        return f"{name} with reserved flags {flags:#06b}"
    body = memoryview(packet)[_fixed_header_length(packet) :]
    try:
        if kind == PUBLISH:
            _check_publish(flags, body)
        elif kind in _ACK_PACKETS:
            _check_length(body, 2, name)
            _packet_id(body, 0, name)
        elif kind in _EMPTY_PACKETS:
            _check_length(body, 0, name)
        else:
            _check_filters(body, name, with_qos=kind == SUBSCRIBE)
    except _Violation as exc:
        return str(exc)
    return None


def _fixed_header_length(packet: bytes) -> int:
    index = 1
    while packet[index] & 0x80:
        index += 1
    return index + 1


def _check_publish(flags: int, body: memoryview) -> None:
    qos = (flags >> 1) & 0b11
    if qos == 3:
        raise _Violation("PUBLISH with QoS 3")
    if qos == 0 and flags & 0b1000:
        raise _Violation("QoS 0 PUBLISH with the DUP flag")
    topic, offset = _string(body, 0, "PUBLISH topic")
    try:
        validate_topic_name(topic)
    except InvalidTopic as exc:
        raise _Violation(f"PUBLISH {exc}") from None
    if qos:
        _packet_id(body, offset, "PUBLISH")


def _check_filters(body: memoryview, name: str, *, with_qos: bool) -> None:
    offset = _packet_id(body, 0, name)
    if offset == len(body):
        raise _Violation(f"{name} without a topic filter")
    while offset < len(body):
        topic_filter, offset = _string(body, offset, f"{name} filter")
        try:
            validate_topic_filter(topic_filter)
        except InvalidTopic as exc:
            raise _Violation(f"{name} {exc}") from None
        if with_qos:
            if offset >= len(body):
                raise _Violation(f"{name} filter without its QoS byte")
            if body[offset] > 2:  # also the six reserved bits [MQTT-3-8.3-4]
                raise _Violation(f"{name} asks for QoS byte {body[offset]:#04x}")
            offset += 1


def _check_length(body: memoryview, length: int, name: str) -> None:
    if len(body) != length:
        raise _Violation(f"{name} of {len(body)} bytes after its fixed header, not {length}")


def _packet_id(body: memoryview, offset: int, name: str) -> int:
    """Check the packet identifier at `offset`; the offset after it."""
    if len(body) < offset + 2:
        raise _Violation(f"{name} without a packet identifier")
    if _ID.unpack_from(body, offset)[0] == 0:
        raise _Violation(f"{name} with packet identifier 0")
    return offset + 2


def _string(body: memoryview, offset: int, what: str) -> tuple[str, int]:
    """A length-prefixed UTF-8 string at `offset`; the string and the offset after it."""
    if len(body) < offset + 2:
        raise _Violation(f"{what} missing")
    end = offset + 2 + _ID.unpack_from(body, offset)[0]
    if end > len(body):
        raise _Violation(f"{what} runs past the end of the packet")
    try:
        return str(body[offset + 2 : end], "utf-8"), end
    except UnicodeDecodeError:
        raise _Violation(f"{what} is not UTF-8") from None
