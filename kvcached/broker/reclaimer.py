"""The broker's pressure reclaim, on a thread of its own.

Why: the sampling thread used to run the reclaim's verbs itself, and a verb waits
for its model to be between two steps. On the H100 a trim waited ~6 s for an idle
graph capture that was compiling (benchmarks/results, `exhaustion`, both runs of
2026-12-07): the samples stopped meanwhile (/control/memory went stale), and the
watchdog restarted the sampling thread and logged every thread's stack for what
was a normal wait. Now the sampling thread samples and `kick`s this one; a kick
while a reclaim runs is remembered and runs once after it (the need is sampled
again then). A reclaim that runs past `stall_limit_s` is reported by the watchdog
(`probe`); nothing restarts it: its verb is what holds it, and a second reclaim
could only ask the same stuck model again.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kvcached.broker.watchdog import Probe, join_or_leave

log = logging.getLogger(__name__)
STALL_LIMIT_S = 60.0   # a reclaim's verbs take seconds at most (an unload, a capture waited out)


class PressureReclaimer:
    """Runs `reclaim` (Broker.tick: sample, plan, act until the need is met) when kicked."""

    def __init__(self, reclaim: Callable[[], int], name: str = "kvcached-reclaim",
                 stall_limit_s: float = STALL_LIMIT_S) -> None:
        self._reclaim = reclaim
        self._name = name
        self._stall_limit_s = stall_limit_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at: float | None = None   # of the reclaim running now; None while idle

    def start(self) -> None:
        if self._thread is None:
            self._stop = threading.Event()   # its own: a thread left stuck by stop() ends on the old one
            self._thread = threading.Thread(target=self._loop, args=(self._stop,), name=self._name, daemon=True)
            self._thread.start()

    def kick(self) -> None:
        """Reclaim now, or once more after the one running (never two at once)."""
        self._wake.set()

    def running_for_s(self) -> float | None:
        started = self._started_at
        return None if started is None else time.monotonic() - started

    def probe(self) -> Probe:
        """For the watchdog: a reclaim running past the limit is reported, not restarted."""
        return Probe("broker pressure reclaim", self.running_for_s, self._stall_limit_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        join_or_leave(thread, timeout_s, "pressure reclaim")

    def _loop(self, stop: threading.Event) -> None:
        while True:
            self._wake.wait()
            if stop.is_set():
                return
            self._wake.clear()
            self._started_at = time.monotonic()
            try:
                self._reclaim()
            except Exception:   # a broken verb or monitor must not end the thread
                log.exception("broker: pressure reclaim failed")
            finally:
                self._started_at = None
