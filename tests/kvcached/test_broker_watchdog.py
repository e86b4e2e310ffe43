"""The watchdog (issue 15): a pressure reclaim stuck in a client's verb no longer stops
the broker's samples, and past its limit is reported with every thread's stack; a
sampling thread stuck in the monitor is noticed by its sample age, reported, and a
new one takes over; the stuck one ends once it returns. Scripted memory
(CONVENTIONS 10); the stuck calls are real threads blocked on events."""
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


def test_a_reclaim_stuck_in_a_verb_leaves_the_samples_flowing_and_is_reported(caplog):
    """The verb runs on the reclaim's own thread (kvcached/broker/reclaimer.py): the sampling
    thread samples on, nothing is restarted, and past its limit the stuck reclaim is
    reported once with every thread's stack; it ends when its verb returns."""
    device = Device()
    config = KvcachedConfig(headroom_bytes=GiB, reclaim_hysteresis_bytes=0, monitor_interval_s=0.01)
    broker = Broker(config, device)
    broker._reclaimer._stall_limit_s = 0.5
    stuck = StuckTrim(device, free=2 * GiB, idle_since=0.0)
    broker.register(ClientSpec("stuck"), stuck)
    device.others = TOTAL - 2 * GiB - GiB // 2          # others in the headroom: reclaim starts
    watchdog = Watchdog(broker.watchdog_probes, interval_s=0.05)
    broker.start()
    try:
        assert stuck.entered.wait(20)                   # the reclaim is inside trim()
        sampler = broker._sampler.thread
        with caplog.at_level(logging.ERROR, logger="kvcached.broker.watchdog"):
            watchdog.start()
            assert _wait(lambda: watchdog.stalls == 1)
            time.sleep(1.0)                             # > the limit: the samples go on meanwhile
            assert (broker.sample_age_s() or 99) < 0.5
            assert broker._sampler.thread is sampler            # nothing restarted
            assert watchdog.stalls == 1                 # reported once, not every round
        report = "\n".join(r.getMessage() for r in caplog.records)
        headline = report.splitlines()[0]
        assert "broker pressure reclaim has shown no progress" in headline and "restarting" not in headline
        assert "Thread kvcached-reclaim" in report and "in trim" in report   # where it was stuck
    finally:
        stuck.release.set()
    try:
        assert _wait(lambda: broker._reclaimer.running_for_s() is None)   # the verb returned: done
        assert stuck.free == 0                          # and what it trimmed is back
    finally:
        watchdog.stop()
        broker.close()


class StuckMonitor(Device):
    """A monitor whose sample() blocks once (as an NVML call that does not return)."""

    def __init__(self) -> None:
        super().__init__()
        self.stall, self.entered, self.release = False, threading.Event(), threading.Event()

    def sample(self):
        if self.stall:
            self.stall = False
            self.entered.set()
            self.release.wait(60)
        return super().sample()


def test_a_sampling_thread_stuck_in_the_monitor_is_replaced_and_the_stacks_are_logged(caplog):
    device = StuckMonitor()
    config = KvcachedConfig(headroom_bytes=GiB, reclaim_hysteresis_bytes=0, monitor_interval_s=0.01)
    broker = Broker(config, device)
    watchdog = Watchdog(lambda: [broker.watchdog_probe(limit_s=0.5)], interval_s=0.05)
    broker.start()
    try:
        assert _wait(lambda: broker.sample_age_s() is not None)
        device.stall = True
        assert device.entered.wait(20)                  # the sampling thread is inside sample()
        first = broker._sampler.thread
        with caplog.at_level(logging.ERROR, logger="kvcached.broker.watchdog"):
            watchdog.start()
            assert _wait(lambda: broker._sampler.thread is not first)   # restarted
            assert _wait(lambda: (broker.sample_age_s() or 99) < 0.5)   # sampling again
        report = "\n".join(r.getMessage() for r in caplog.records)
        assert "broker sampling thread has shown no progress" in report
        assert f"Thread {first.name}" in report and "in sample" in report   # where it was stuck
        assert watchdog.stalls == 1
        assert broker.snapshot()["sample_age_s"] < 0.5
    finally:
        device.release.set()
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
