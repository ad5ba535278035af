"""Microbenchmark: cost of one `CompiledAcl.check_publish` for a 10-rule ACL.

Prints one JSON object:
``{"acl_check_us": ..., "acl_check_uncached_us": ..., "rules": 10}``
(microseconds per check, best of several rounds; "uncached" uses cache_size=0 so
every check runs the rules). Budget (see the task): <= 5 us per check on 2 cores.

Run: ``.venv/bin/python bench/acl.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from shared.acl import AclRule, CompiledAcl, Permission, RuleAction, expand_placeholders

__all__ = ["main", "measure_us", "ten_rules"]

ROUNDS = 7
CHECKS_PER_ROUND = 200_000

# A realistic worst-ish mix: denies first, then allows of every filter shape;
# the topics below match late rules, so most rules are tried before a decision.
_RULES: tuple[tuple[Permission, RuleAction, str], ...] = (
    ("deny", "all", "devices/{device_id}/secret/#"),
    ("deny", "all", "$SYS/#"),
    ("deny", "publish", "devices/{device_id}/commands/#"),
    ("allow", "subscribe", "devices/{device_id}/commands/#"),
    ("allow", "publish", "fleet/announce"),
    ("allow", "publish", "devices/{device_id}/status"),
    ("allow", "publish", "groups/+/devices/{device_id}"),
    ("allow", "publish", "devices/{device_id}/+/alerts"),
    ("allow", "publish", "devices/{device_id}/logs/#"),
    ("allow", "publish", "devices/{device_id}/telemetry/#"),
)

_TOPICS: tuple[str, ...] = (
    "devices/dev-1/telemetry",
    "devices/dev-1/telemetry/temperature",
    "devices/dev-1/logs/boot",
    "devices/dev-1/sensor-7/alerts",
)


def ten_rules(device_id: str = "dev-1") -> tuple[AclRule, ...]:
    """The benchmark's 10 rules, expanded for `device_id`."""
    stored = [AclRule(permission=p, action=a, topic=t) for p, a, t in _RULES]
    return expand_placeholders(stored, device_id)


def measure_us(acl: CompiledAcl, topics: Sequence[str], checks: int = CHECKS_PER_ROUND) -> float:
    """Best-of-ROUNDS microseconds per `check_publish` over `topics` round-robin."""
    check = acl.check_publish
    repeat = max(1, checks // len(topics))
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        for _ in range(repeat):
            for topic in topics:
                check(topic)
        elapsed = time.perf_counter_ns() - start
        best = min(best, elapsed / (repeat * len(topics)) / 1000.0)
    return best


def main() -> None:
    rules = ten_rules()
    cached = CompiledAcl(rules)
    uncached = CompiledAcl(rules, cache_size=0)
    result = {
        "acl_check_us": round(measure_us(cached, _TOPICS), 3),
        "acl_check_uncached_us": round(measure_us(uncached, _TOPICS), 3),
        "rules": len(rules),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
