"""MQTT 3.1.1 packets written byte by byte, for tests that must send what no client library
would (malformed packets) or check an encoder against an independent one."""

from __future__ import annotations

import struct


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + remaining_length(len(body)) + body


def connect(
    client_id: str | bytes,
    username: str | None,
    password: str | None,
    *,
    protocol: bytes = b"MQTT",
    level: int = 4,
    flags: int | None = None,
) -> bytes:
    if flags is None:
        flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password else 0)
    body = utf8(protocol) + bytes([level, flags]) + struct.pack("!H", 30) + utf8(client_id)
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += utf8(password)
    return packet(0x10, body)


def publish(topic: bytes | str, payload: bytes, *, qos: int = 0, packet_id: int = 1) -> bytes:
    body = utf8(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)


def subscribe(filters: list[tuple[bytes | str, int]], *, first_byte: int = 0x82) -> bytes:
    body = struct.pack("!H", 7) + b"".join(utf8(f) + bytes([q]) for f, q in filters)
    return packet(first_byte, body)
