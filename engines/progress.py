"""Load progress: LoadProgress events to a callback, and a bar for the command line.

Engines report through a ProgressReporter, which stamps the model name, keeps
the fraction from going backwards, drops repeats (llama.cpp calls back for
every tensor), and never lets a failing listener break a load. The tray and
dashboard subscribe with a plain callback; the CLI uses ProgressBar, which
draws one line on a terminal and prints stage changes when output is not a
terminal (logs, CI).
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from engines.types import LoadProgress

log = logging.getLogger(__name__)
ProgressCallback = Callable[[LoadProgress], None]
MIN_STEP = 0.01   # smaller advances within one stage are not reported


class ProgressReporter:
    def __init__(self, model: str, callback: ProgressCallback | None) -> None:
        self.model = model
        self.callback = callback
        self._last: LoadProgress | None = None
        self._lock = threading.Lock()

    def report(self, fraction: float, stage: str) -> None:
        if self.callback is None:
            return
        with self._lock:
            last = self._last
            fraction = min(1.0, max(fraction, last.fraction if last else 0.0, 0.0))
            if last is not None and last.stage == stage and fraction - last.fraction < MIN_STEP \
                    and fraction < 1.0:
                return
            event = LoadProgress(model=self.model, fraction=fraction, stage=stage)
            self._last = event
        try:
            self.callback(event)
        except Exception:  # a listener's bug must not fail the load
            log.exception("load progress listener failed for %s", self.model)


class ProgressBar:
    """A CLI progress bar: `ProgressBar()` is a ProgressCallback.

        engine.load(progress=ProgressBar())
    """

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stage = ""
        self._started = time.monotonic()

    def render(self, event: LoadProgress) -> str:
        filled = int(round(event.fraction * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        return f"{event.model} [{bar}] {event.fraction * 100:5.1f}% {event.stage}"

    def __call__(self, event: LoadProgress) -> None:
        if self.is_tty:
            end = "\n" if event.stage == "ready" else ""
            self.stream.write("\r" + self.render(event) + end)
        elif event.stage != self._stage:
            # Not a terminal: one line per stage, not a carriage-return storm in a log.
            elapsed = time.monotonic() - self._started
            self.stream.write(f"{self.render(event)} ({elapsed:.1f}s)\n")
        self._stage = event.stage
        self.stream.flush()
