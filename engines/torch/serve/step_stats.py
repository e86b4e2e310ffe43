"""What the serving loop did lately, logged every few seconds while it works.

Under load the first question is always "where does the time go": how many
steps a second, how full the decode batch is, how much prompt is prefilled,
and how a step's wall time splits into running the model, sampling and
handing tokens to the callers ("run" is the host's launching; the GPU's
work is waited for in "sample", whose argmax is the step's first sync). One INFO line per model per interval answers it
from the daemon's log, with no profiler attached (the colocation benchmark
keeps these lines in its result).

Each phase is timed by a context manager made once (`with stats.phase("run"):`),
so timing a step allocates nothing but the clock's floats.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PHASES = ("schedule", "run", "sample", "post")


class Phase:
    """Seconds spent inside `with` blocks of one phase since the last log line."""
    __slots__ = ("seconds", "_start")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start


@dataclass
class StepStats:
    name: str
    interval_s: float = 10.0
    steps: int = 0
    decode_rows: int = 0
    prefill_tokens: int = 0
    phases: dict[str, Phase] = field(default_factory=lambda: {p: Phase() for p in PHASES})
    since: float = field(default_factory=time.monotonic)

    def phase(self, name: str) -> Phase:
        return self.phases[name]

    @property
    def phase_s(self) -> dict[str, float]:
        return {p: ph.seconds for p, ph in self.phases.items()}

    def record(self, decode_rows: int, prefill_tokens: int) -> None:
        """One step: its decode batch and prompt tokens computed (its phases timed themselves)."""
        self.steps += 1
        self.decode_rows += decode_rows
        self.prefill_tokens += prefill_tokens

    def maybe_log(self, waiting: int, running: int) -> None:
        now = time.monotonic()
        span = now - self.since
        if span < self.interval_s:
            return
        if self.steps:
            per_step = {p: 1000 * s / self.steps for p, s in self.phase_s.items()}
            log.info("%s: %.1f steps/s, decode %.0f tok/s (batch %.1f), prefill %.0f tok/s, "
                     "step ms %s, busy %.0f%%, running %d, waiting %d",
                     self.name, self.steps / span, self.decode_rows / span,
                     self.decode_rows / self.steps, self.prefill_tokens / span,
                     " ".join(f"{p} {ms:.2f}" for p, ms in per_step.items()),
                     100 * sum(self.phase_s.values()) / span, running, waiting)
        self.steps = self.decode_rows = self.prefill_tokens = 0
        for ph in self.phases.values():
            ph.seconds = 0.0
        self.since = now
