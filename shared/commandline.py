"""How every Gatepass command reports failure: one line on stderr, a non-zero exit.

Owns: running a parsed sub-command and turning the failures a user can cause or fix
(Gatepass errors, SQLite errors, file-system errors, Ctrl-C) into one line
`PROG: error: ...` and an exit status, never a traceback. Must not: parse arguments
or print anything else.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Callable

from shared.errors import GatepassError

__all__ = ["fail", "run_command"]

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_FAILURE


def run_command(prog: str, args: argparse.Namespace, *, database: str = "database") -> int:
    """Run `args.func(args)`; `database` names the SQLite file in messages."""
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except GatepassError as exc:
        return fail(prog, str(exc))
    except sqlite3.Error as exc:
        return fail(prog, f"{database}: {exc}")
    except OSError as exc:
        return fail(prog, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
