"""The watchdog (issue 15): a broker whose sampling thread is stuck in a client's
verb is noticed by its sample age, every thread's stack is logged, and a new
sampling thread takes over; the stuck one ends once its verb returns. Scripted
memory (CONVENTIONS 10); the stuck verb is a real thread blocked on an event."""
from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_broker_broker import GiB, TOTAL, Device, Verbs  # noqa: E402

from kvcached.broker import Broker, ClientSpec  # noqa: E402
from kvcached.broker.watchdog import Probe, Watchdog, all_stacks  # noqa: E402
from kvcached.config import KvcachedConfig  # noqa: E402


class StuckTrim(Verbs):
    """A verb that waits (as a model's trim waited for a capture that never ended)."""

    def __init__(self, device: Device, **kw) -> None:
        super().__init__(device, **kw)
        self.entered, self.release = threading.Event(), threading.Event()

    def trim(self) -> int:
        self.entered.set()
        self.release.wait(60)
        return super().trim()


def _wait(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_a_sampling_thread_stuck_in_a_verb_is_replaced_and_the_stacks_are_logged(caplog):
    device = Device()
    config = KvcachedConfig(headroom_bytes=GiB, reclaim_hysteresis_bytes=0, monitor_interval_s=0.01)
    broker = Broker(config, device)
    stuck = StuckTrim(device, free=2 * GiB, idle_since=0.0)
    broker.register(ClientSpec("stuck"), stuck)
    device.others = TOTAL - 2 * GiB - GiB // 2          # others in the headroom: reclaim starts
    watchdog = Watchdog(lambda: [broker.watchdog_probe(limit_s=0.5)], interval_s=0.05)
    broker.start()
    try:
        assert stuck.entered.wait(20)                   # the sampling thread is inside trim()
        first = broker._thread
        with caplog.at_level(logging.ERROR, logger="kvcached.broker.watchdog"):
            watchdog.start()
            assert _wait(lambda: broker._thread is not first)   # restarted
            assert _wait(lambda: (broker.sample_age_s() or 99) < 0.5)   # sampling again
        report = "\n".join(r.getMessage() for r in caplog.records)
        assert "broker sampling thread has shown no progress" in report
        assert f"Thread {first.name}" in report and "in trim" in report   # where it was stuck
        time.sleep(1.0)                                 # > the limit: would stall again if
        assert (broker.sample_age_s() or 99) < 0.5      # the new thread entered trim() too
        assert watchdog.stalls == 1                     # reported once, not every round
        assert broker.snapshot()["sample_age_s"] < 0.5
    finally:
        stuck.release.set()
        watchdog.stop()
        broker.close()
    first.join(20)
    assert not first.is_alive()                         # the replaced thread ended


def test_an_idle_or_moving_probe_is_never_reported():
    ages = iter([None, 0.1, 5.0, 5.0, 0.0, 6.0])
    recovered = []
    watchdog = Watchdog(lambda: [Probe("worker", lambda: next(ages), 1.0, lambda: recovered.append(1))])
    seen = [watchdog.check() for _ in range(6)]
    assert seen == [[], [], ["worker"], ["worker"], [], ["worker"]]
    assert watchdog.stalls == 2 and recovered == [1, 1]  # each stall once
    assert "test_an_idle_or_moving_probe_is_never_reported" in all_stacks()
