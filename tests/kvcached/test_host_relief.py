"""HostRelief: when the host is short of memory, idle clients give host memory back,
lowest priority and idlest first, until it has room again; busy ones are left alone.

The broker and its registry are real; the clients are small verb objects that
report what they give, and the host's MemAvailable is scripted (each client's
relief raises it by what it gave), since a test cannot starve its own machine."""
from __future__ import annotations

import time

from kvcached.broker import Broker
from kvcached.broker.client import ClientSpec
from kvcached.broker.host_relief import HostRelief, host_is_short
from kvcached.config import KvcachedConfig

GiB = 1 << 30


class Host:
    def __init__(self, available: int) -> None:
        self.available = available

    def read(self) -> tuple[int, float | None]:
        return self.available, None


class Client:
    """Verbs of a paused model holding `host` bytes it can put on disk."""

    def __init__(self, host: Host, holds: int, busy: bool = False, idle_since: float = 0.0) -> None:
        self.host, self.holds, self.busy, self.since = host, holds, busy, idle_since
        self.relieved = 0

    def held_bytes(self) -> int:
        return 0

    def is_busy(self) -> bool:
        return self.busy

    def idle_since(self) -> float:
        return self.since

    def trim(self) -> int:
        return 0

    drop_prefixes = pause = unload = trim

    def relieve_host(self) -> int:
        self.relieved += 1
        freed, self.holds = self.holds, 0
        self.host.available += freed
        return freed


def test_short_means_below_the_floor_or_stalling():
    assert host_is_short(GiB // 2, GiB, None) and not host_is_short(2 * GiB, GiB, None)
    assert host_is_short(8 * GiB, GiB, 25.0) and not host_is_short(8 * GiB, GiB, 1.0)


def test_idle_clients_give_back_in_victim_order_until_the_host_has_room():
    host = Host(GiB // 4)
    broker = Broker(KvcachedConfig(backend="host", host_low_bytes=0))
    now = time.monotonic()
    clients = {"important": Client(host, 2 * GiB, idle_since=now - 100),
               "busy": Client(host, 4 * GiB, busy=True),
               "old": Client(host, GiB, idle_since=now - 50),
               "recent": Client(host, GiB, idle_since=now)}
    for name, verbs in clients.items():
        broker.register(ClientSpec(name, priority=1 if name == "important" else 0), verbs)
    relief = HostRelief(broker, low_bytes=2 * GiB, read=host.read)
    try:
        assert relief.tick() == 2 * GiB                 # old, then recent: enough
        assert [c.relieved for c in clients.values()] == [0, 0, 1, 1]
        assert [e.client for e in broker.events.recent()] == ["old", "recent"]
        assert {e.step for e in broker.events.recent()} == {"host_relief"}
        assert relief.tick() == 0                       # room now: nothing asked
    finally:
        broker.close()


def test_the_broker_runs_the_watch_with_its_own_thread_and_stops_it():
    broker = Broker(KvcachedConfig(backend="host", host_low_bytes=GiB))
    assert broker.host_relief is not None
    broker.start()
    try:
        assert broker.host_relief._thread.is_alive()
    finally:
        broker.close()
    assert broker.host_relief._thread is None
    assert Broker(KvcachedConfig(backend="host", host_low_bytes=0)).host_relief is None
