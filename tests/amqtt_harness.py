"""Test helpers: an in-process amqtt 0.12.1 broker, a TCP cut-able proxy, and an
independent subscriber (a stock threaded paho client, not our link).

Only tests import this module. Waiting is on conditions with deadlines, never sleeps.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from amqtt.broker import Broker
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

__all__ = ["AmqttBroker", "BrokerProcess", "CutProxy", "Subscriber", "wait_until"]


class AmqttBroker:
    """A stock amqtt broker on 127.0.0.1; `port` stays the same across `restart`."""

    def __init__(
        self,
        *,
        anonymous: bool = True,
        plugins: dict[str, Any] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.port = 0
        self._anonymous = anonymous
        self._plugins = plugins or {}
        self._tls = tls
        self._broker: Broker | None = None

    def _config(self) -> dict[str, Any]:
        listener: dict[str, Any] = {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}
        if self._tls is not None:
            listener.update(ssl=True, certfile=str(self._tls[0]), keyfile=str(self._tls[1]))
        auth = {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": self._anonymous}
        }
        config: dict[str, Any] = {
            "listeners": {"default": listener},
            "plugins": {**auth, **self._plugins},
        }
        return config

    async def start(self) -> int:
        broker = Broker(self._config())
        await broker.start()
        server = broker._servers["default"].instance
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]
        self._broker = broker
        return self.port

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    async def restart(self) -> None:
        await self.stop()
        await self.start()


_BROKER_MAIN = """
import asyncio, sys
from amqtt.broker import Broker
async def main():
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:" + sys.argv[1]}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    print(broker._servers["default"].instance.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


class BrokerProcess:
    """amqtt in a child process, so a test can SIGKILL it mid-stream and restart it.

    (In-process, amqtt 0.12.1's graceful ``shutdown()`` can hang for a long time while
    QoS 1 traffic is in flight; a kill is also the outage the agent must survive.)
    """

    def __init__(self) -> None:
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30.0) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _BROKER_MAIN,
            str(self.port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("amqtt child exited before listening")
        self.port = int(line)
        self._proc = proc
        return self.port

    async def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            await proc.wait()


class CutProxy:
    """A TCP relay to the broker that can drop every connection (a network outage)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.up = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Close every relayed connection now."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


async def wait_until(
    predicate: Callable[[], bool], changed: asyncio.Event, *, timeout: float, what: str
) -> None:
    """Wait until `predicate()` holds, re-checking whenever `changed` fires."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                changed.clear()
                if predicate():
                    return
                await changed.wait()
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


@dataclass
class Subscriber:
    """A stock paho client on its own thread that records every message it receives."""

    port: int
    topic_filter: str
    client_id: str = "independent-subscriber"
    received: list[tuple[str, bytes]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: paho.Client | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        client.reconnect_delay_set(1, 1)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.connect_async("127.0.0.1", self.port, keepalive=30)
        client.loop_start()
        self._client = client

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    async def wait_subscribed(self, timeout: float = 15.0) -> None:
        await wait_until(
            lambda: self.subscribed, self.changed, timeout=timeout, what="the subscriber's SUBACK"
        )

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [payload for _, payload in self.received]

    def _poke(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.changed.set)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic_filter, qos=1)

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, _r: Any, _p: Any) -> None:
        self.subscribed = True
        self._poke()

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, _r: Any, _p: Any) -> None:
        self.subscribed = False
        self._poke()

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append((message.topic, bytes(message.payload)))
        self._poke()
