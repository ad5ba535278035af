"""A process's open-file limit, raised at start to fit its connections (the gateway's
`serve`, and the simulator, which holds a socket per virtual device).

Owns: `open_file_budget` (pure: from the current soft and hard limits and the
connections the settings allow, the soft limit to set and a warning when even the hard
limit falls short) and `raise_open_file_limit`, which applies it. Must not: touch the
hard limit (raising it needs privileges and is the administrator's call, e.g. systemd's
`LimitNOFILE=`), or lower anything.

Why: a login shell or a systemd service starts with a soft limit of 1024 open files,
and every MQTT connection holds one. Without this, `accept()` on both listeners fails
with EMFILE at about a thousand devices, whatever `max_connections` says.
"""

from __future__ import annotations

import resource
from typing import Final, NamedTuple

__all__ = ["RESERVED_FILES", "OpenFileBudget", "open_file_budget", "raise_open_file_limit"]

RESERVED_FILES: Final = 1024
"""Descriptors beyond the MQTT connections: HTTPS connections (enrollments, token
refreshes), the registry and session store with their WAL files, logs, the listeners."""


class OpenFileBudget(NamedTuple):
    soft: int
    warning: str | None


def open_file_budget(soft: int, hard: int, max_connections: int) -> OpenFileBudget:
    """The soft limit to run with, never lower than `soft` nor higher than `hard`."""
    wanted = max_connections + RESERVED_FILES
    short = hard != resource.RLIM_INFINITY and hard < wanted
    target = hard if short else wanted
    keep = soft == resource.RLIM_INFINITY or soft >= target
    warning = None
    if short:
        warning = (
            f"open-file limit {hard} is below {max_connections} connections + "
            f"{RESERVED_FILES} ({wanted}): raise it (systemd LimitNOFILE=, ulimit -Hn) "
            "or allow fewer connections"
        )
    return OpenFileBudget(soft if keep else target, warning)


def raise_open_file_limit(max_connections: int) -> OpenFileBudget:
    """Raise this process's soft RLIMIT_NOFILE as far as `open_file_budget` says."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = open_file_budget(soft, hard, max_connections)
    if budget.soft != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (budget.soft, hard))
    return budget
