"""The daemon's event hub: model state changes, load progress and broker events, in one stream.

The control API's GET /control/events follows it (the dashboard's timeline and
the tray). Publishing is thread-safe and never blocks: engines report load
progress from worker threads, the broker from its own. Each subscriber gets an
asyncio queue; a subscriber that falls far behind loses its oldest events
rather than slowing anyone. A short history is replayed to new subscribers so
a freshly opened dashboard shows the recent past.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvcached.broker.events import EventKind

log = logging.getLogger(__name__)

HISTORY = 500
SUBSCRIBER_QUEUE = 1000


@dataclass(frozen=True)
class HubEvent:
    kind: str              # "model" (state change), "progress" (loading), "broker" (a reclaim step...), "settings"
    data: dict
    seq: int = 0
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {**self.data, "kind": self.kind, "seq": self.seq, "time": self.time}


# A model's state change announces the step that caused it (the broker's, or the control API's).
STATE_KINDS: dict[str, EventKind] = {"paused": EventKind.PAUSE, "unloaded": EventKind.UNLOAD}


def event_kind(kind: str, data: Mapping) -> EventKind | None:
    """What moved memory in a hub event, in the broker's one vocabulary: the step of a
    "broker" event, RECLAIM for the manager's own "reclaim", the verb behind a "model"
    state change; None for events that move none (progress, settings...)."""
    if kind == "broker":
        return EventKind.parse(data.get("step"))
    if kind == "reclaim":
        return EventKind.RECLAIM
    if kind == "model":
        return STATE_KINDS.get(str(data.get("state")))
    return None


class _Subscriber:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[HubEvent] = asyncio.Queue(SUBSCRIBER_QUEUE)

    def offer(self, event: HubEvent) -> None:
        """Runs on the subscriber's loop."""
        if self.queue.full():
            self.queue.get_nowait()  # drop the oldest: a slow reader never blocks the hub
        self.queue.put_nowait(event)


class EventHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._history: collections.deque[HubEvent] = collections.deque(maxlen=HISTORY)
        self._subscribers: list[_Subscriber] = []
        self._seq = itertools.count(1)
        self._listeners: list = []

    def listen(self, callback) -> None:
        """Call callback(event) for every event, on the publisher's thread (metrics counting)."""
        self._listeners.append(callback)

    def publish(self, kind: str, **data: object) -> HubEvent:
        with self._lock:
            event = HubEvent(kind, dict(data), next(self._seq))
            self._history.append(event)
            subscribers = list(self._subscribers)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not stop the event
                log.exception("event listener failed")
        for sub in subscribers:
            try:
                sub.loop.call_soon_threadsafe(sub.offer, event)
            except RuntimeError:  # that loop is closed: the subscriber is gone
                self._drop(sub)
        return event

    def recent(self, limit: int = HISTORY) -> list[HubEvent]:
        with self._lock:
            return list(self._history)[-limit:]

    def subscribe(self) -> _Subscriber:
        sub = _Subscriber(asyncio.get_running_loop())
        with self._lock:
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: _Subscriber) -> None:
        self._drop(sub)

    def _drop(self, sub: _Subscriber) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)
