"""Live progress for people: one rich progress bar per phase, plain lines when piped.

Owns: how phases look while they run (rich `Progress` on a terminal; one summary line
per phase otherwise, so logs and tests stay readable). Must not: measure anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = ["PhaseHandle", "PhaseProgress"]


@dataclass(slots=True)
class PhaseHandle:
    _advance: Callable[[float], None]
    _describe: Callable[[str], None]
    done: float = 0.0

    def advance(self, n: float = 1.0) -> None:
        self.done += n
        self._advance(n)

    def note(self, text: str) -> None:
        """Extra text shown beside the bar (e.g. running message counts)."""
        self._describe(text)


class PhaseProgress:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    @contextmanager
    def phase(self, name: str, total: float, unit: str = "devices") -> Iterator[PhaseHandle]:
        started = time.monotonic()
        if not self.live:
            handle = PhaseHandle(lambda n: None, lambda text: None)
            yield handle
            took = time.monotonic() - started
            self.say(f"{name:<8} {handle.done:g}/{total:g} {unit} in {took:.1f} s")
            return
        progress = Progress(
            TextColumn("[bold]{task.fields[phase]:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=self.console,
            transient=False,
        )
        with progress:
            task: TaskID = progress.add_task(name, total=total, phase=name, note="")
            handle = PhaseHandle(
                lambda n: progress.advance(task, n),
                lambda text: progress.update(task, note=text),
            )
            yield handle
