"""The progress display of long commands (`extract`, `train`): a rich bar per phase on a terminal; where nobody
watches one (dvc repro, CI, a job scheduler's log) a bar shows nothing until the end, so a plain status line
instead, at most one per `STATUS_INTERVAL_S`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from datetime import timedelta
from typing import Any

from rich.progress import Progress, ProgressColumn

from stages.common import err_console

STATUS_INTERVAL_S = 30.0  # often enough to see that a job is alive, rarely enough not to flood its log


class StatusLines:
    """Plain lines on stderr: the first at once (the log shows the run started), then at most one per interval."""

    def __init__(self) -> None:
        self._last = -math.inf

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        if now - self._last < STATUS_INTERVAL_S:
            return
        self._last = now
        err_console.print(line, markup=False, highlight=False)


def eta(remaining: float, done: float, elapsed_s: float) -> str:
    """The time `remaining` units take at the rate so far (`done` in `elapsed_s`), as H:MM:SS; `?` before any."""
    if done <= 0 or elapsed_s <= 0:
        return "?"
    return str(timedelta(seconds=round(remaining * elapsed_s / done)))


class PhaseProgress:
    """A command's progress callback: `__enter__` returns `report` (a bar per phase, on a terminal),
    `status_line` (elsewhere) or None (disabled: under torchrun only the main rank reports). A command's
    display says which columns its bars have and what each event shows."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Progress | None = None
        self.tasks: dict[Hashable, Any] = {}
        self.status = StatusLines()

    def columns(self) -> tuple[ProgressColumn, ...]:
        raise NotImplementedError

    def report(self, *event: Any) -> None:
        raise NotImplementedError

    def status_line(self, *event: Any) -> None:
        raise NotImplementedError

    def update(self, phase: Hashable, description: str, total: int | None, completed: int, **fields: Any) -> None:
        """Move the bar of `phase` (made on its first event) to `completed` of `total`, with its fields."""
        assert self.bar is not None
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(description, total=total, **fields)
        self.bar.update(self.tasks[phase], completed=completed, **fields)

    def __enter__(self) -> Callable[..., None] | None:
        if not self.enabled:
            return None
        if not err_console.is_terminal:
            return self.status_line
        self.bar = Progress(*self.columns(), console=err_console)
        self.bar.__enter__()
        return self.report

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
