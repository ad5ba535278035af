"""What a run measures while it happens: latency samples, errors, attacks, throughput.

Owns: the mutable recorder every part of a run writes into (latencies in milliseconds
by name, error counts by kind, attack attempts and refusals by kind, per-second
throughput, how many MQTT TLS handshakes resumed a session), stamped with seconds
since the run's start. Must not: summarise or render (`simulator.stats` and
`simulator.report` do).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from simulator.stats import Timeline

__all__ = ["LATENCY_KINDS", "AttackTally", "Metrics"]

LATENCY_KINDS = ("enroll", "token", "connect", "puback", "delivery")


@dataclass(slots=True)
class AttackTally:
    """Hostile attempts a scenario made, and how many the gateway refused, by kind."""

    attempted: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)

    def attempt(self, kind: str, *, refused: bool) -> None:
        self.attempted[kind] += 1
        if refused:
            self.refused[kind] += 1

    @property
    def let_through(self) -> int:
        return sum(self.attempted.values()) - sum(self.refused.values())


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self.latencies: dict[str, list[float]] = {kind: [] for kind in LATENCY_KINDS}
        self.errors: Counter[str] = Counter()
        self.attacks = AttackTally()
        self.timeline = Timeline()
        self.phases: dict[str, float] = {}
        self.mqtt_tls: Counter[str] = Counter()
        """MQTT connections of the fleet: "handshakes" and how many of them "resumed"."""

    def elapsed(self) -> float:
        return self._clock() - self.started

    def latency(self, kind: str, seconds: float) -> None:
        self.latencies.setdefault(kind, []).append(seconds * 1000.0)

    def mqtt_handshake(self, *, resumed: bool) -> None:
        self.mqtt_tls["handshakes"] += 1
        if resumed:
            self.mqtt_tls["resumed"] += 1

    def error(self, kind: str, n: int = 1) -> None:
        self.errors[kind] += n

    def event(self, kind: str, n: int = 1) -> None:
        self.timeline.add(kind, self.elapsed(), n)

    def phase_took(self, name: str, seconds: float) -> None:
        self.phases[name] = round(seconds, 3)
