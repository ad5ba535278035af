"""Prometheus metrics of the MQTT listener.

Owns: the metric objects, registered in the registry the caller passes (never the
global default one, so tests can run many brokers in one process).
Must not: decide anything or log.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["MqttMetrics"]


class MqttMetrics:
    """Counters and gauges the listener updates; label values are enum values."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connects = Counter(
            "gatepass_mqtt_connects",
            "CONNECT attempts by outcome (accepted, refused) and reason.",
            ["outcome", "reason"],
            registry=registry,
        )
        self.publishes_refused = Counter(
            "gatepass_mqtt_publishes_refused",
            "PUBLISH packets delivered to no one, by reason.",
            ["reason"],
            registry=registry,
        )
        self.subscribes_refused = Counter(
            "gatepass_mqtt_subscribes_refused",
            "SUBSCRIBE filters answered 0x80, by reason.",
            ["reason"],
            registry=registry,
        )
        self.sessions_closed = Counter(
            "gatepass_mqtt_sessions_closed",
            "Live sessions the listener closed, by reason (expired, revoked, ...).",
            ["reason"],
            registry=registry,
        )
        self.live_sessions = Gauge(
            "gatepass_mqtt_live_sessions", "Authenticated connections now open.", registry=registry
        )
        self.messages_dropped = Counter(
            "gatepass_mqtt_messages_dropped",
            "Messages dropped by a full bounded queue, by queue.",
            ["queue"],
            registry=registry,
        )
