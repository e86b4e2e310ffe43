"""The broker's sampling thread: one round every interval, replaceable when it stops.

Each round (Broker._sample_and_kick) samples the device and, under pressure, kicks the
reclaim's own thread (reclaimer.py): no client verb runs here. What can still stop
it is the monitor itself (an NVML call that does not return). The watchdog reads its
heartbeat (`probe`: the age of the last sample) and, past the limit, `restart`s it:
a new thread of a new generation takes over, and the stuck one ends once it returns
and sees it was replaced.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kvcached.broker.watchdog import Probe, join_or_leave

log = logging.getLogger(__name__)


class SamplingThread:
    def __init__(self, one_round: Callable[[], None], interval_s: float,
                 last_sample_age_s: Callable[[], float | None]) -> None:
        self._one_round = one_round
        self._interval_s = interval_s
        self._last_sample_age_s = last_sample_age_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._generation = 0     # a replaced thread ends when it sees a newer one
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self.thread is None:
                self._stop.clear()
                self._start_locked()

    def restart(self) -> None:
        """A new sampling thread in place of one that stopped (the watchdog's recovery);
        the old one ends once it comes back."""
        with self._lock:
            if self.thread is None or self._stop.is_set():
                return
            log.warning("broker: restarting the sampling thread (last sample %.1f s ago)",
                        self._last_sample_age_s() or 0.0)
            self._start_locked()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        thread, self.thread = self.thread, None
        join_or_leave(thread, timeout_s, "sampling thread")

    def probe(self, limit_s: float) -> Probe:
        """For the watchdog: the last sample's age while running, restarted past `limit_s`."""
        return Probe("broker sampling thread",
                     lambda: self._last_sample_age_s() if self.thread is not None else None,
                     limit_s, self.restart)

    def _start_locked(self) -> None:
        self._generation += 1
        self.thread = threading.Thread(target=self._loop, args=(self._generation,),
                                       name=f"kvcached-broker-{self._generation}", daemon=True)
        self.thread.start()

    def _loop(self, generation: int) -> None:
        while not self._stop.wait(self._interval_s):
            if generation != self._generation:
                return   # replaced by restart() while this one was stuck
            try:
                self._one_round()
            except Exception:   # a broken monitor must not end the thread
                log.exception("broker: sampling failed")
