"""Progress where nobody watches a terminal (dvc repro, CI, a job scheduler's log): there a rich bar shows
nothing until the end, so a command prints a plain status line instead, at most one per `STATUS_INTERVAL_S`."""

from __future__ import annotations

import math
import time
from datetime import timedelta

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
