"""A watchdog for the threads the daemon cannot do without.

On the H200 (issue 15) the broker's sampling thread stopped inside a model's
verb and /control/memory reported the same free figure for minutes, while the
daemon hung: nobody noticed, and nothing said where each thread was. This
thread looks at a few heartbeats every `interval_s`: each is a probe with an
age (seconds since its thread last showed progress; None while it has nothing
to do) and a limit. A probe past its limit is reported once per stall: every
thread's stack goes to the log, and the probe's `recover` runs (the broker
starts a new sampling thread; an engine worker is only reported). It never
calls into a probe's thread or takes its locks, so it cannot itself hang on
what it watches.
"""
from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    name: str
    age_s: Callable[[], float | None]        # None: idle, nothing to watch now
    limit_s: float
    recover: Callable[[], None] | None = None


def all_stacks() -> str:
    """Every thread's stack, named, as one text (what faulthandler writes, via logging)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"Thread {names.get(ident, '?')} ({ident}):\n{stack}")
    return "\n".join(parts)


def join_or_leave(thread: threading.Thread | None, timeout_s: float, what: str) -> None:
    """Wait up to timeout_s for a thread to end; one stuck (in a verb, in the monitor) is
    left running and logged, never allowed to hang shutdown."""
    if thread is None:
        return
    thread.join(timeout=timeout_s)
    if thread.is_alive():
        log.warning("broker: the %s did not stop in %.0f s; leaving it", what, timeout_s)


class Watchdog:
    """Checks `probes()` (read anew each round: models come and go) every interval."""

    def __init__(self, probes: Callable[[], list[Probe]], interval_s: float = 1.0,
                 name: str = "kvcached-watchdog") -> None:
        self._probes = probes
        self._interval_s = interval_s
        self._stalled: set[str] = set()   # reported already, until it moves again
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.stalls = 0                    # stalls seen (tests and /metrics read it)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def check(self) -> list[str]:
        """One round; returns the probes found stalled now (newly or still)."""
        stalled = []
        for probe in self._probes():
            try:
                age = probe.age_s()
            except Exception:  # noqa: BLE001 - a broken probe must not stop the others
                log.exception("watchdog: probe %s failed", probe.name)
                continue
            if age is None or age <= probe.limit_s:
                self._stalled.discard(probe.name)
                continue
            stalled.append(probe.name)
            if probe.name not in self._stalled:
                self._stalled.add(probe.name)
                self._report(probe, age)
        return stalled

    def _report(self, probe: Probe, age: float) -> None:
        self.stalls += 1
        log.error("watchdog: %s has shown no progress for %.1f s (limit %.1f s); every thread's "
                  "stack follows%s\n%s", probe.name, age, probe.limit_s,
                  "; restarting it" if probe.recover else "", all_stacks())
        if probe.recover is not None:
            try:
                probe.recover()
            except Exception:  # noqa: BLE001
                log.exception("watchdog: recovering %s failed", probe.name)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.check()
