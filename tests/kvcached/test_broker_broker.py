"""The broker driven by scripted memory (CONVENTIONS 10): the monitor is a
script of samples and the clients are recording verbs whose memory is a
number the script's free memory follows."""
from __future__ import annotations

import time

import pytest

from kvcached.broker import Broker, ClientSpec, Step
from kvcached.broker.sample import MemorySample
from kvcached.config import KvcachedConfig
from kvcached.errors import AdmissionDenied, ConfigError, DoesNotFit, InvalidArgument

GiB = 1 << 30
TOTAL = 80 * GiB


class Device:
    """Scripted device memory: others' use is set by the test, ours is the clients' sum."""

    name = "scripted"

    def __init__(self) -> None:
        self.others = 0
        self.clients: list[Verbs] = []

    def sample(self) -> MemorySample:
        ours = sum(c.held for c in self.clients)
        return MemorySample(TOTAL, TOTAL - ours - self.others, ours, self.others)

    def close(self) -> None:
        pass


class Verbs:
    """A client whose memory splits into free pages, prefixes, live KV and weights."""

    def __init__(self, device: Device, free=0, prefixes=0, live=0, weights=0, busy=False, idle_since=0.0):
        self.free, self.prefixes, self.live, self.weights = free, prefixes, live, weights
        self.busy, self._idle = busy, idle_since
        self.calls: list[str] = []
        device.clients.append(self)

    @property
    def held(self) -> int:
        return self.free + self.prefixes + self.live + self.weights

    def held_bytes(self): return self.held
    def cached_bytes(self): return self.free + self.prefixes
    def is_busy(self): return self.busy
    def idle_since(self): return self._idle

    def _give(self, verb: str, *parts: str) -> int:
        self.calls.append(verb)
        n = sum(getattr(self, p) for p in parts)
        for p in parts:
            setattr(self, p, 0)
        return n

    def trim(self): return self._give("trim", "free")
    def drop_prefixes(self): return self._give("drop_prefixes", "prefixes")
    def pause(self): return self._give("pause", "live")
    def unload(self): return self._give("unload", "weights", "free", "prefixes", "live")


@pytest.fixture
def device():
    return Device()


def make(device, **kw) -> Broker:
    # These tests count exact shortfalls; the hysteresis has its own tests (test_broker_hysteresis.py).
    kw.setdefault("reclaim_hysteresis_bytes", 0)
    return Broker(KvcachedConfig(headroom_bytes=2 * GiB, monitor_interval_s=0.005, **kw), device)


def test_nothing_happens_while_the_headroom_is_free(device):
    broker = make(device)
    a = Verbs(device, free=GiB, live=4 * GiB)
    broker.register(ClientSpec("a"), a)
    device.others = 60 * GiB
    assert broker.tick() == 0 and a.calls == []


def test_pressure_takes_cheapest_steps_until_the_headroom_is_back(device):
    broker = make(device)
    lo = Verbs(device, free=GiB, prefixes=GiB, live=4 * GiB, weights=2 * GiB, idle_since=5.0)
    hi = Verbs(device, free=3 * GiB, live=4 * GiB, idle_since=1.0)
    broker.register(ClientSpec("lo", priority=0), lo)
    broker.register(ClientSpec("hi", priority=9), hi)
    device.others = TOTAL - 15 * GiB - GiB          # free = 1 GiB: 1 GiB short
    assert broker.tick() == GiB
    assert lo.calls == ["trim"] and hi.calls == []  # lowest priority's trim was enough
    device.others += 4 * GiB                        # free -2 GiB: every trim, then prefixes
    got = broker.tick()
    assert hi.calls == ["trim"] and lo.calls == ["trim", "trim", "drop_prefixes"]
    assert got == 4 * GiB
    steps = [(e.client, e.step) for e in broker.events.recent()]
    assert steps == [("lo", "trim"), ("hi", "trim"), ("lo", "drop_prefixes")]
    assert all(e.reason == "pressure" and e.duration_s >= 0 for e in broker.events.recent())


def test_pause_before_unload_and_busy_or_pinned_are_spared(device):
    broker = make(device)
    idle = Verbs(device, live=4 * GiB, weights=4 * GiB, idle_since=1.0)
    busy = Verbs(device, live=8 * GiB, busy=True)
    pinned = Verbs(device, live=8 * GiB, idle_since=0.0)
    broker.register(ClientSpec("idle"), idle)
    broker.register(ClientSpec("busy"), busy)
    broker.register(ClientSpec("pinned", min_bytes=GiB), pinned)
    device.others = 66 * GiB        # free -10 GiB: 12 short; only idle's 8 may go
    assert broker.tick() == 8 * GiB
    assert idle.calls[-2:] == ["pause", "unload"]
    assert "pause" not in busy.calls and "pause" not in pinned.calls


def test_auto_yield_off_only_samples(device):
    broker = make(device)
    a = Verbs(device, free=4 * GiB)
    broker.register(ClientSpec("a"), a)
    broker.set_auto_yield(False)
    device.others = TOTAL - 4 * GiB
    assert broker.tick() == 0 and a.calls == []
    assert broker.snapshot()["auto_yield"] is False
    assert broker.reclaim() == 4 * GiB             # manual still works


def test_manual_reclaim_of_one_client_and_a_target(device):
    broker = make(device)
    a = Verbs(device, free=GiB, live=GiB, weights=GiB)
    b = Verbs(device, free=GiB)
    broker.register(ClientSpec("a"), a)
    handle_b = broker.register(ClientSpec("b"), b)
    assert broker.reclaim(target_bytes=GiB) == GiB and a.calls == ["trim"] and b.calls == []
    assert broker.reclaim(client=handle_b) == GiB and b.calls == ["trim"]
    assert broker.reclaim(client="a", steps=[Step.PAUSE]) == GiB and a.weights == GiB
    assert all(e.reason == "manual" for e in broker.events.recent())
    with pytest.raises(InvalidArgument):
        broker.reclaim(client="nobody")


def test_admission_reclaims_lower_priorities_or_refuses(device):
    broker = make(device, budget_bytes=20 * GiB)
    low = Verbs(device, live=6 * GiB, idle_since=1.0)
    peer = Verbs(device, live=8 * GiB)
    asker = Verbs(device, live=2 * GiB)
    broker.register(ClientSpec("low", priority=0), low)
    broker.register(ClientSpec("peer", priority=5), peer)
    me = broker.register(ClientSpec("me", priority=5, max_bytes=14 * GiB), asker)
    assert me.admit(GiB) == 0                          # 16 + 1 <= 20: nothing taken
    assert me.admit(10 * GiB) == 6 * GiB               # 16 + 10 > 20: low is paused
    # Nobody holds anything cached: the cheap steps are not even tried.
    assert low.calls == ["pause"] and peer.calls == []
    with pytest.raises(AdmissionDenied, match="maximum"):
        me.admit(13 * GiB)                             # 2 + 13 > 14
    asker.live = 8 * GiB                               # 16 held; 5 more needs peer's memory
    with pytest.raises(AdmissionDenied, match="lower priority"):
        me.admit(5 * GiB)
    assert peer.calls == []                            # refused before taking anything
    with pytest.raises(InvalidArgument):
        me.admit(-1)
    admits = [e for e in broker.events.recent() if e.step == "admit"]
    # Only an admission that took something is an event (one per request would flood the log).
    assert [e.client for e in admits] == ["me"] and admits[0].reason == "admission"


def test_admission_takes_cached_prefixes_of_any_priority_and_commits_under_the_lock(device):
    broker = make(device, budget_bytes=20 * GiB)
    peer = Verbs(device, prefixes=3 * GiB, live=5 * GiB, busy=True)   # equal priority, busy
    high = Verbs(device, free=GiB, live=4 * GiB, idle_since=1.0)       # higher priority, idle
    asker = Verbs(device, live=3 * GiB)
    broker.register(ClientSpec("peer", priority=1), peer)
    broker.register(ClientSpec("high", priority=9), high)
    me = broker.register(ClientSpec("me", priority=1), asker)
    committed = []

    def commit(n: int) -> None:      # the engine counts the grant in its held bytes here
        asker.live += n
        committed.append((n, broker._reclaim_lock.locked()))

    # 16 held + 7 asked > 20: 3 back, from what is cached (nothing running is lost).
    assert me.admit(7 * GiB, commit) == 4 * GiB
    assert high.calls == ["trim"] and peer.calls == ["trim", "drop_prefixes"]
    assert committed == [(7 * GiB, True)] and asker.held == 10 * GiB
    # More than the cheap steps could give: refused before anything is taken; a busy
    # peer and an idle higher priority are never paused for it.
    with pytest.raises(AdmissionDenied, match="at most"):
        me.admit(2 * GiB, commit)
    assert peer.calls == ["trim", "drop_prefixes"] and high.calls == ["trim"] and len(committed) == 1


def test_sums_read_between_reclaims_never_count_moving_bytes_twice(device):
    """An admission takes from one client and grants another: a reader holding
    between_reclaims() sees it before or after, and the admission waits for it."""
    import threading

    broker = make(device, budget_bytes=10 * GiB)
    giver = Verbs(device, prefixes=4 * GiB, live=4 * GiB)
    asker = Verbs(device, live=2 * GiB)
    broker.register(ClientSpec("giver"), giver)
    me = broker.register(ClientSpec("asker"), asker)
    admitted = threading.Event()

    def admit() -> None:
        me.admit(4 * GiB, lambda n: setattr(asker, "live", asker.live + n))
        admitted.set()

    with broker.between_reclaims():
        worker = threading.Thread(target=admit)
        worker.start()
        assert not admitted.wait(0.2)                       # held off while we read
        assert broker.held_bytes() == 10 * GiB and giver.calls == []
    worker.join(5)
    assert admitted.is_set() and giver.calls == ["trim", "drop_prefixes"]
    assert broker.held_bytes() == 10 * GiB                  # 4 GiB moved, none counted twice


def test_engines_record_their_own_steps(device):
    broker = make(device)
    handle = broker.register(ClientSpec("a"), Verbs(device))
    handle.record("resume", duration_s=0.01, detail="before a step")
    (event,) = broker.events.recent()
    assert (event.client, event.step, event.reason) == ("a", "resume", "engine")


def test_a_failing_verb_is_an_event_not_a_crash(device):
    broker = make(device)

    class Broken(Verbs):
        def trim(self):
            raise RuntimeError("driver said no")

    bad = Broken(device, free=GiB, idle_since=0.0)
    good = Verbs(device, free=GiB, idle_since=1.0)
    broker.register(ClientSpec("bad"), bad)
    broker.register(ClientSpec("good"), good)
    device.others = TOTAL - 2 * GiB - GiB
    assert broker.tick() == GiB
    failed = [e for e in broker.events.recent() if e.detail]
    assert failed[0].client == "bad" and "driver said no" in failed[0].detail


def test_registration_rules(device):
    broker = make(device)
    broker.register(ClientSpec("a"), Verbs(device))
    with pytest.raises(ConfigError):
        broker.register(ClientSpec("a"), Verbs(device))
    with pytest.raises(ConfigError):
        broker.register(ClientSpec("b"), object())
    with pytest.raises(ConfigError):
        ClientSpec("c", min_bytes=2, max_bytes=1)
    broker.unregister("a")
    assert broker.clients() == []


def test_the_thread_yields_to_scripted_pressure_and_streams_events(device):
    broker = make(device)
    a = Verbs(device, free=3 * GiB, idle_since=0.0)
    broker.register(ClientSpec("a"), a)
    with broker, broker.subscribe() as sub:
        device.others = TOTAL - 3 * GiB - GiB
        event = sub.get(timeout=10)
        assert event is not None and (event.client, event.step, event.bytes_returned) == ("a", "trim", 3 * GiB)
        snap = broker.snapshot()
    assert snap["clients"][0]["name"] == "a" and snap["device"]["monitor"] == "scripted"
    assert snap["headroom_bytes"] == 2 * GiB
    time.sleep(0)  # the thread has stopped: nothing more changes
    assert a.calls == ["trim"]


def test_one_tick_keeps_reclaiming_while_the_other_app_keeps_growing(device):
    broker = make(device)
    clients = [Verbs(device, free=2 * GiB, idle_since=float(i)) for i in range(3)]
    for i, c in enumerate(clients):
        broker.register(ClientSpec(f"c{i}"), c)
    growth = iter([2 * GiB, 2 * GiB, 0, 0])
    real_sample = device.sample

    def growing_sample():
        s = real_sample()
        device.others += next(growth, 0)     # the other app takes what was given back
        return s

    device.sample = growing_sample
    device.others = TOTAL - 6 * GiB - GiB    # 1 GiB short
    assert broker.tick() == 6 * GiB          # three rounds in one tick
    assert [c.calls for c in clients] == [["trim"], ["trim"], ["trim"]]


def test_a_load_unloads_idle_models_of_equal_priority_the_idlest_first(device):
    broker = make(device, budget_bytes=20 * GiB)
    older = Verbs(device, prefixes=GiB, live=2 * GiB, weights=5 * GiB, idle_since=1.0)
    newer = Verbs(device, live=2 * GiB, weights=5 * GiB, idle_since=2.0)
    loading = Verbs(device)
    broker.register(ClientSpec("older"), older)
    broker.register(ClientSpec("newer"), newer)
    me = broker.register(ClientSpec("me"), loading)
    with pytest.raises(AdmissionDenied, match="in the way: older"):
        me.admit(10 * GiB)                       # a request's KV: equals are not paused for it
    assert older.calls == [] and newer.calls == []
    # 15 held + 10 > 20: the prefixes (1), then pausing both (4), leave 10 + 10 = 20.
    assert broker.admit(me, 10 * GiB, load=True) == 5 * GiB
    assert older.calls[-2:] == ["drop_prefixes", "pause"] and newer.calls[-1] == "pause"
    assert "unload" not in older.calls + newer.calls
    assert broker.admit(me, 13 * GiB, load=True) == 5 * GiB   # then unload, the idlest first
    assert older.calls[-1] == "unload" and "unload" not in newer.calls


def test_a_load_that_can_never_fit_is_refused_before_anything_is_taken(device):
    broker = make(device, budget_bytes=20 * GiB)
    pinned = Verbs(device, weights=6 * GiB)
    idle = Verbs(device, weights=8 * GiB)
    busy = Verbs(device, live=4 * GiB, busy=True)
    broker.register(ClientSpec("pinned", min_bytes=6 * GiB), pinned)
    broker.register(ClientSpec("idle"), idle)
    broker.register(ClientSpec("busy"), busy)
    me = broker.register(ClientSpec("me"), Verbs(device))
    with pytest.raises(DoesNotFit, match="budget_bytes"):
        broker.admit(me, 15 * GiB, load=True)    # 15 > 20 - 6 pinned: never
    assert idle.calls == [] and busy.calls == []
    with pytest.raises(AdmissionDenied, match=r"in the way: .*busy \(4096 MiB, busy\)"):
        broker.admit(me, 13 * GiB, load=True)    # 13 <= 14 could fit once "busy" is done: wait
    assert idle.calls == [] and busy.calls == []
