"""The event loop `gatepass-gateway serve` and `gatepass-sim run` run on: uvloop when it
is installed, else asyncio's.

Owns: the choice of event loop implementation for the gateway and simulator processes,
made once at start-up by installing an event loop policy (`install_event_loop_policy`),
so that the `asyncio.run(...)` that follows runs on it. (The simulator's loop carries
thousands of agents; asyncio's pure-Python timers and selector were a fifth of it.)
Must not: create or run a loop, import the gateway's services, or be called by the
agent or by libraries (the agent runs inside its host program's loop, which is not
ours to choose).

uvloop is an optional dependency (the `gateway` extra, not on Windows): its absence is
normal, never an error.
"""

from __future__ import annotations

import asyncio
from typing import Final, Literal

__all__ = ["ASYNCIO", "UVLOOP", "LoopName", "install_event_loop_policy"]

LoopName = Literal["uvloop", "asyncio"]
UVLOOP: Final = "uvloop"
ASYNCIO: Final = "asyncio"


def install_event_loop_policy() -> LoopName:
    """Make new event loops uvloop's if `import uvloop` works; return which loop it is.

    Call before `asyncio.run`. Without uvloop the current policy is left as it is.
    """
    try:
        import uvloop
    except ImportError:
        return ASYNCIO
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return UVLOOP
