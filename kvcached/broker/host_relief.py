"""Host memory under pressure: the paused models' host copies go to disk or go away.

The broker's ladder moves models' memory from the device to the host (pause,
weights to host); the host is the desktop's memory too. When it runs short
(MemAvailable under `low_bytes`, or /proc/pressure/memory's "some avg10" at
`PRESSURE_THRESHOLD` or more), each idle client with the optional verb
`relieve_host()` gives host memory back, lowest priority and idlest first,
until the host has room again: a torch model spills its paused KV to checksummed
files under the data dir (it comes back on resume) and frees the pinned buffers
it kept; a llama.cpp model drops the conversations it parked. Each is an event
(`EventKind.HOST_RELIEF`) in the broker's log.

One thread, sampling once a second (/proc reads, ~20 us): memory pressure on the
host builds over seconds, not within a GPU allocation's 50 ms.
"""
from __future__ import annotations

import logging
import threading
import time

from kvcached.broker.events import Event, EventKind
from kvcached.broker.monitor_host import read_pressure
from kvcached.broker.policy import PRESSURE_THRESHOLD, victim_order
from kvcached.rss import meminfo_bytes

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
MiB = 1 << 20


def host_is_short(available: int, low_bytes: int, pressure: float | None) -> bool:
    """Is the host short of memory: below `low_bytes` available, or stalling on memory?"""
    return available < low_bytes or (pressure is not None and pressure >= PRESSURE_THRESHOLD)


def read_host() -> tuple[int, float | None]:
    """(MemAvailable bytes, PSI some avg10 or None)."""
    return meminfo_bytes("MemAvailable"), read_pressure()


class HostRelief:
    """Watches the host's memory and asks the broker's idle clients to give host memory back."""

    def __init__(self, broker, low_bytes: int, read=read_host, interval_s: float = INTERVAL_S) -> None:
        self.broker = broker
        self.low_bytes = low_bytes
        self._read = read
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "HostRelief":
        if self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kvcached-host-relief", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.tick()
            except Exception:   # a broken verb must not end the watch
                log.exception("host relief failed")

    def tick(self) -> int:
        """One look at the host; while it is short, idle clients give back one at a time.
        Returns host bytes given back."""
        got = 0
        handles = {h.name: h for h in self.broker.clients()}
        for view in victim_order(h.view() for h in handles.values()):
            available, pressure = self._read()
            if not host_is_short(available, self.low_bytes, pressure):
                break
            handle = handles[view.name]
            relieve = getattr(handle.verbs, "relieve_host", None)
            if view.is_busy or relieve is None:
                continue
            started = time.monotonic()
            freed = int(relieve() or 0)
            if freed:
                got += freed
                self.broker.events.append(Event(view.name, EventKind.HOST_RELIEF, freed,
                                                time.monotonic() - started, "host",
                                                f"{available // MiB} MiB available"))
                log.info("host short of memory (%d MiB available): %s gave back %d MiB of host memory",
                         available // MiB, view.name, freed // MiB)
        return got
