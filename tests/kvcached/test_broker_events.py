"""The bounded event log and its subscribers."""
from __future__ import annotations

import threading

from kvcached.broker.events import SUBSCRIBER_QUEUE, Event, EventLog


def event(i: int) -> Event:
    return Event(f"c{i}", "trim", i, 0.001, "pressure")


def test_log_is_bounded_and_numbered():
    log = EventLog(3)
    for i in range(5):
        log.append(event(i))
    recent = log.recent()
    assert len(log) == 3 and [e.bytes_returned for e in recent] == [2, 3, 4]
    assert [e.seq for e in recent] == [3, 4, 5]
    assert [e.seq for e in log.recent(since_seq=4)] == [5]
    assert [e.seq for e in log.recent(limit=1)] == [5]
    assert recent[0].to_dict()["step"] == "trim"


def test_subscribers_see_new_events_across_threads():
    log = EventLog(10)
    sub = log.subscribe()
    got = []

    def follow():
        for e in sub:
            got.append(e.bytes_returned)
            if len(got) == 3:
                sub.close()

    reader = threading.Thread(target=follow)
    reader.start()
    for i in range(3):
        log.append(event(i))
    reader.join(5)
    assert got == [0, 1, 2] and not reader.is_alive()
    log.append(event(9))                         # a closed subscriber gets nothing more
    assert sub.get(timeout=0) is None


def test_a_slow_subscriber_loses_its_oldest_events_never_blocks():
    log = EventLog(10)
    with log.subscribe() as sub:
        for i in range(SUBSCRIBER_QUEUE + 5):
            log.append(event(i))
        assert sub.dropped == 5
        assert sub.get(timeout=0).bytes_returned == 5


def test_one_event_kind_says_what_gave_memory_back():
    """The broker's steps, the daemon's own reclaim and the rest share one vocabulary."""
    from kvcached.broker.client import Step
    from kvcached.broker.events import EventKind

    assert {EventKind(step.value) for step in Step} <= {k for k in EventKind if k.is_reclaim()}
    assert EventKind.RECLAIM.is_reclaim()
    assert not any(k.is_reclaim() for k in (EventKind.RESUME, EventKind.RELOAD, EventKind.ADMIT,
                                            EventKind.AUTO_YIELD))
    assert EventKind.parse("trim") is EventKind.TRIM and EventKind.parse("defrag") is None
    event = Event("m", "trim", 4096, 0.01)            # a plain word becomes the kind
    assert event.step is EventKind.TRIM and event.to_dict()["step"] == "trim"
