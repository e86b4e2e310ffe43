"""The daemon's side of the memory broker: engines registered as clients, events forwarded.

The broker (kvcached.broker) knows nothing of models; it calls ReclaimVerbs.
EngineVerbs adapts an engines.base.Engine to those verbs. The broker's event
log is pumped by one thread into the daemon's EventHub, so GET /control/events
shows reclaim steps next to model state changes.

A daemon may run without a broker (BrokerLink(None)): the kvcached backend
could not start here, for instance. Then every call is a no-op and
reclaim_all() returns None so the manager does the steps itself.
"""
from __future__ import annotations

import logging
import threading

from app.server.events import EventHub
from app.settings import ModelSettings
from engines.base import Engine
from engines.types import ModelState

log = logging.getLogger(__name__)


class EngineVerbs:
    """ReclaimVerbs over an Engine. Thread-safe because the engine is."""

    def __init__(self, engine: Engine, hub: EventHub | None = None) -> None:
        self.engine = engine
        self.hub = hub

    def held_bytes(self) -> int:
        return self.engine.memory().total_bytes

    def is_busy(self) -> bool:
        return self.engine.busy

    def idle_since(self) -> float:
        return self.engine.idle_since

    def trim(self) -> int:
        return self.engine.trim()

    def drop_prefixes(self) -> int:
        return self.engine.drop_prefixes()

    def pause(self) -> int:
        freed = self.engine.pause()
        self._state(ModelState.PAUSED, freed)
        return freed

    def unload(self) -> int:
        # The manager sees state UNLOADED on the next request and loads again.
        freed = self.engine.unload()
        self._state(ModelState.UNLOADED, freed)
        return freed

    def _state(self, state: ModelState, freed: int) -> None:
        if self.hub is not None:
            self.hub.publish("model", model=self.engine.info.name, state=state.value,
                             bytes_returned=freed, reason="pressure")


class BrokerLink:
    """Registers engines with the broker (or does nothing when there is none)."""

    def __init__(self, broker, hub: EventHub | None = None) -> None:
        self.broker = broker
        self.hub = hub
        self._stop = threading.Event()
        self._pump: threading.Thread | None = None
        if broker is not None and hub is not None:
            self._pump = threading.Thread(target=self._pump_events, name="broker-events", daemon=True)
            self._pump.start()

    @property
    def enabled(self) -> bool:
        return self.broker is not None

    def register(self, name: str, engine: Engine, model: ModelSettings | None) -> None:
        if self.broker is None:
            return
        from kvcached.broker.client import ClientSpec

        model = model or ModelSettings()
        spec = ClientSpec(name, priority=model.priority, min_bytes=model.min_bytes, max_bytes=model.max_bytes)
        try:
            self.broker.register(spec, EngineVerbs(engine, self.hub))
        except Exception:  # serving without the broker's protection beats not serving
            log.exception("could not register %s with the broker", name)

    def unregister(self, name: str) -> None:
        if self.broker is None:
            return
        try:
            self.broker.unregister(name)
        except Exception:
            log.exception("could not unregister %s from the broker", name)

    def reclaim_all(self) -> int | None:
        """Run the broker's whole ladder now; None without a broker."""
        if self.broker is None:
            return None
        return int(self.broker.reclaim() or 0)

    def set_auto_yield(self, enabled: bool) -> None:
        if self.broker is not None:
            self.broker.set_auto_yield(enabled)

    def snapshot(self) -> dict | None:
        if self.broker is None:
            return None
        snap = self.broker.snapshot()
        return snap if isinstance(snap, dict) else snap.to_dict()

    def recent_events(self, limit: int = 200) -> list[dict]:
        if self.broker is None:
            return []
        return [e.to_dict() for e in self.broker.events.recent(limit)]

    def _pump_events(self) -> None:
        subscription = self.broker.events.subscribe()
        try:
            while not self._stop.is_set():
                event = subscription.get(timeout=0.25)
                if event is not None:
                    data = event.to_dict()
                    data["broker_seq"] = data.pop("seq")  # the hub numbers its own events
                    self.hub.publish("broker", **data)
        finally:
            subscription.close()

    def close(self) -> None:
        self._stop.set()
        if self.broker is not None and hasattr(self.broker, "close"):
            try:
                self.broker.close()
            except Exception:
                log.exception("broker close failed")
        if self._pump is not None:
            self._pump.join(timeout=1.0)
