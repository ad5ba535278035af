"""Prometheus metrics of the HTTPS side (EST and OAuth).

Owns: the metric objects, registered in a registry of their own so that several
gateways (tests, the simulator) can live in one process. Must not: decide anything.
The MQTT listener registers its own metrics in the same registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["GatewayMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Histogram(
            "gatepass_http_request_seconds",
            "HTTPS request latency by route and status.",
            ["route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.enrollments = Counter(
            "gatepass_enrollments",
            "EST enrollments by kind (enroll, reenroll) and outcome.",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.tokens_issued = Counter(
            "gatepass_tokens_issued", "Access tokens issued.", registry=self.registry
        )
        self.tokens_refused = Counter(
            "gatepass_tokens_refused",
            "Token requests refused, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.token_latency = Histogram(
            "gatepass_token_issue_seconds",
            "Time to authenticate a client and mint its token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).observe(seconds)
