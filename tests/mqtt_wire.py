"""MQTT 3.1.1 packets written byte by byte, for tests that must send what no client library
would (malformed packets) or check an encoder against an independent one."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from dataclasses import dataclass

from gateway.tls import client_context
from tests.helpers_mqtt import Device, MqttPki

CLOSE_DEADLINE_S = 5.0
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


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
    keepalive: int = 30,
) -> bytes:
    if flags is None:
        flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password else 0)
    body = utf8(protocol) + bytes([level, flags]) + struct.pack("!H", keepalive) + utf8(client_id)
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


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, pki: MqttPki, port: int, device: Device) -> RawClient:
        context = client_context(pki.ca_file, device.cert_file, device.key_file)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
        return cls(reader, writer)

    @classmethod
    async def connected(
        cls,
        pki: MqttPki,
        port: int,
        device: Device,
        token: str | None = None,
        keepalive: int = 30,
    ) -> RawClient:
        client = await cls.open(pki, port, device)
        token = pki.token(device) if token is None else token
        client.writer.write(connect(device.device_id, device.device_id, token, keepalive=keepalive))
        await client.writer.drain()
        reply = await asyncio.wait_for(client.reader.readexactly(4), CLOSE_DEADLINE_S)
        assert reply == CONNACK_ACCEPTED
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.drain()

    async def until_closed(self) -> bytes:
        """Everything the broker sent until it closed the connection (fails if it never does)."""
        received = bytearray()
        async with asyncio.timeout(CLOSE_DEADLINE_S):
            while True:
                try:
                    chunk = await self.reader.read(4096)
                except (ConnectionError, ssl.SSLError):
                    break
                if not chunk:
                    break
                received += chunk
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()
        return bytes(received)
