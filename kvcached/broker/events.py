"""The broker's bounded event log, its one vocabulary of event kinds, and subscribers.

Every reclaim step the broker takes (and every resume or admission an engine
reports) is one Event: when, which client, which step (an EventKind), how many
bytes came back and how long it took. EventKind is the one vocabulary of what
moved memory: the daemon's /metrics and the tray read it too (through
app.models.events.event_kind), and `is_reclaim()` is the one answer to "did this
give memory back". The log keeps the last `event_log_size` events;
the control API and the dashboard subscribe and stream new ones as they come.
A slow subscriber loses its oldest unread events, never blocks the broker.
"""
from __future__ import annotations

import collections
import enum
import queue
import threading
import time as _time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

SUBSCRIBER_QUEUE = 1000   # events a subscriber may fall behind before the oldest are dropped


class EventKind(enum.StrEnum):
    """What an event records. The reclaim steps carry client.Step's names."""
    POOL = "pool"                    # the page pool's reserve freed
    TRIM = "trim"
    DROP_PREFIXES = "drop_prefixes"
    PAUSE = "pause"
    WEIGHTS_TO_HOST = "weights_to_host"
    UNLOAD = "unload"
    RECLAIM = "reclaim"              # a reclaim the daemon ran itself (the control API's)
    RESUME = "resume"                # an engine mapped its paused KV back
    RELOAD = "reload"                # an engine loaded again after an unload
    ADMIT = "admit"                  # an admission that reclaimed from others first
    AUTO_YIELD = "auto_yield"        # the switch was turned
    HOST_RELIEF = "host_relief"      # host memory given back (paused KV to disk): not the GPU's

    def is_reclaim(self) -> bool:
        """Did this give memory back (as opposed to take it, or change a setting)?"""
        return self in RECLAIM_KINDS

    @classmethod
    def parse(cls, value: object) -> "EventKind | None":
        """The kind a string names; None for anything else (an older or newer peer's word)."""
        try:
            return cls(value)
        except ValueError:
            return None


RECLAIM_KINDS = frozenset({EventKind.POOL, EventKind.TRIM, EventKind.DROP_PREFIXES, EventKind.PAUSE,
                           EventKind.WEIGHTS_TO_HOST, EventKind.UNLOAD, EventKind.RECLAIM})


@dataclass(frozen=True)
class Event:
    client: str               # client name; "" for the page pool / the broker itself
    step: EventKind           # a str: compares and serializes as its name
    bytes_returned: int       # bytes given back (0 for resume/admit)
    duration_s: float
    reason: str = ""          # "pressure", "manual", "admission", "engine"
    detail: str = ""          # e.g. an error's message when a step failed
    time: float = field(default_factory=_time.time)          # wall clock, for people
    monotonic: float = field(default_factory=_time.monotonic)
    seq: int = 0              # position in the log, set by EventLog.append

    def __post_init__(self) -> None:
        object.__setattr__(self, "step", EventKind(self.step))   # ValueError on an unknown word

    def to_dict(self) -> dict:
        return asdict(self)


class Subscription:
    """A queue of new events; iterate it, or get(timeout). close() to leave."""

    def __init__(self, log: "EventLog") -> None:
        self._log = log
        self._queue: queue.Queue[Event] = queue.Queue(SUBSCRIBER_QUEUE)
        self.dropped = 0
        self.closed = False

    def put(self, event: Event) -> None:
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None when none came within `timeout` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self) -> Iterator[Event]:
        while not self.closed:
            event = self.get(timeout=0.5)
            if event is not None:
                yield event

    def close(self) -> None:
        self.closed = True
        self._log.unsubscribe(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventLog:
    """Thread-safe bounded log of Events with subscribers."""

    def __init__(self, maxlen: int) -> None:
        self._events: collections.deque[Event] = collections.deque(maxlen=maxlen)
        self._subscribers: list[Subscription] = []
        self._lock = threading.Lock()
        self._seq = 0

    def append(self, event: Event) -> Event:
        with self._lock:
            self._seq += 1
            event = Event(**{**event.to_dict(), "seq": self._seq})
            self._events.append(event)
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.put(event)
        return event

    def recent(self, limit: int | None = None, since_seq: int = 0) -> list[Event]:
        """Events still in the log after `since_seq`, oldest first, at most `limit` (the newest)."""
        with self._lock:
            events = [e for e in self._events if e.seq > since_seq]
        return events[-limit:] if limit else events

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        with self._lock:
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)
