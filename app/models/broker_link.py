"""The daemon's side of the memory broker: engines registered as clients, events forwarded.

The broker (kvcached.broker) knows nothing of models; it calls ReclaimVerbs.
engines.broker_client.EngineVerbs adapts an Engine to them; the subclass here
also announces pause and unload on the daemon's EventHub, so the tray and
dashboard see a model the broker paused under pressure. The broker's event log
is pumped by one thread into the hub, so GET /control/events shows reclaim
steps next to model state changes.

The broker is opened in the background (open_in_background): opening it picks
a VMM backend, which imports torch (seconds on a small CPU), and the daemon
must answer /health at once. Models loaded before it is ready are registered
when it arrives. Where it cannot run at all, every call is a no-op and
reclaim_all() returns None so the manager does the steps itself.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from app.models.events import EventHub
from app.settings import ModelSettings
from engines.base import Engine
from engines.types import ModelState

log = logging.getLogger(__name__)
LOAD_RETRY_S = 0.25   # a load waiting for busy models to give memory back asks again this often


def _verbs_class():
    from engines.broker_client import EngineVerbs

    class AnnouncingVerbs(EngineVerbs):
        """EngineVerbs that tell the hub when the broker pauses or unloads a model, and count
        a model as busy while a request holds it (leased, not yet submitted: a load waiting
        for room must not unload the model that has just loaded for that request)."""

        def __init__(self, engine: Engine, hub: EventHub | None, in_use: Callable[[], bool]) -> None:
            super().__init__(engine)
            self.hub = hub
            self.in_use = in_use

        def is_busy(self) -> bool:
            return super().is_busy() or self.in_use()

        def pause(self) -> int:
            freed = super().pause()
            self._announce(ModelState.PAUSED, freed)
            return freed

        def weights_to_host(self) -> int:
            freed = super().weights_to_host()
            self._announce(ModelState.PAUSED, freed, rung="weights_on_host")
            return freed

        def relieve_host(self) -> int:
            freed = super().relieve_host()   # host memory: a model with weights there may unload
            if self.engine.state is ModelState.UNLOADED:
                self._announce(ModelState.UNLOADED, freed, reason_detail="host short of memory")
            return freed

        def unload(self) -> int:
            freed = super().unload()  # the manager loads again on the next request
            self._announce(ModelState.UNLOADED, freed)
            return freed

        def _announce(self, state: ModelState, freed: int, **extra: object) -> None:
            if self.hub is not None and freed:
                self.hub.publish("model", model=self.engine.info.name, state=state.value,
                                 bytes_returned=freed, reason="broker", **extra)

    return AnnouncingVerbs


class BrokerLink:
    """Registers engines with the broker, once it is there (or never, without one)."""

    def __init__(self, broker=None, hub: EventHub | None = None, backend: str = "none") -> None:
        self.hub = hub
        self.broker = None
        self.backend = backend
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Engine, ModelSettings | None]] = {}
        self._clients: dict[str, tuple[Engine, object, object]] = {}   # name -> (engine, handle, verbs)
        self.in_use: Callable[[str], bool] = lambda name: False   # the manager's: a request holds it
        self._stop = threading.Event()
        self._pump: threading.Thread | None = None
        self._closers: list[Callable[[], None]] = []
        self.ready = threading.Event()
        if broker is not None:
            self.attach(broker, backend)

    @property
    def enabled(self) -> bool:
        return self.broker is not None

    def open_in_background(self, open_broker: Callable[[], tuple[object | None, str]]) -> None:
        def run() -> None:
            try:
                broker, backend = open_broker()
                if broker is not None:
                    self.attach(broker, backend)
            finally:
                self.ready.set()

        threading.Thread(target=run, name="broker-open", daemon=True).start()

    def attach(self, broker, backend: str) -> None:
        with self._lock:
            self.broker, self.backend = broker, backend
            pending, self._pending = self._pending, {}
        for name, (engine, model) in pending.items():
            self._register_now(name, engine, model)
        if self.hub is not None:
            self._pump = threading.Thread(target=self._pump_events, name="broker-events", daemon=True)
            self._pump.start()
        self.ready.set()

    def register(self, name: str, engine: Engine, model: ModelSettings | None) -> None:
        with self._lock:
            if self.broker is None:
                self._pending[name] = (engine, model)
                return
        self._register_now(name, engine, model)

    def _register_now(self, name: str, engine: Engine, model: ModelSettings | None) -> tuple | None:
        """(handle, verbs) of engine as the client `name`, registering it unless it is already."""
        from engines.broker_client import register_engine

        with self._lock:
            known = self._clients.get(name)
        if known is not None and known[0] is engine:
            return known[1:]
        if known is not None:
            self.unregister(name, known[0])
        model = model or ModelSettings()
        verbs = _verbs_class()(engine, self.hub, lambda: self.in_use(name))
        try:   # attaches the handle: its requests are admitted against the budget from now on
            handle = register_engine(self.broker, engine, model.priority, model.min_bytes, model.max_bytes,
                                     verbs=verbs)
        except Exception:  # serving without the broker's protection beats not serving
            log.exception("could not register %s with the broker", name)
            return None
        with self._lock:
            self._clients[name] = (engine, handle, verbs)
        return handle, verbs

    def load(self, name: str, engine: Engine, model: ModelSettings | None, progress=None,
             wait_s: float = 0.0) -> None:
        """Load engine as the client `name`, once the broker has made room for what the
        load will hold (engines.broker_client.admitted_load). While what is in the way is
        busy the load waits, up to wait_s, then AdmissionDenied names it (HTTP 503);
        DoesNotFit when no reclaim could ever make room. Without a broker (not open yet,
        or none here) a plain load, registered when the broker comes."""
        from engines.broker_client import admitted_load
        from kvcached.errors import AdmissionDenied

        if self.broker is None:
            engine.load(progress)
            self.register(name, engine, model)
            return
        registered = self._register_now(name, engine, model)
        if registered is None:   # the broker refused it (logged): serve unprotected
            engine.load(progress)
            return
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    admitted_load(*registered, progress)
                    return
                except AdmissionDenied:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(LOAD_RETRY_S)
        except BaseException:
            self.unregister(name, engine)   # not loaded: nothing of it for the broker to weigh
            raise

    def unregister(self, name: str, engine: Engine | None = None) -> None:
        with self._lock:
            self._pending.pop(name, None)
            known = self._clients.get(name)
            if known is not None and (engine is None or known[0] is engine):
                del self._clients[name]
            broker = self.broker
        if engine is not None:
            engine.attach_broker(None)
        if broker is not None:
            broker.unregister(name)

    def reclaim_all(self) -> int | None:
        """Run the broker's whole ladder now; None without a broker."""
        if self.broker is None:
            return None
        return int(self.broker.reclaim() or 0)

    def set_auto_yield(self, enabled: bool) -> None:
        if self.broker is not None:
            self.broker.set_auto_yield(enabled)

    def snapshot(self) -> dict | None:
        return self.broker.snapshot() if self.broker is not None else None

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

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run closer after the broker closes (the daemon's page pool, its backend)."""
        self._closers.append(closer)

    def close(self) -> None:
        self._stop.set()
        if self.broker is not None:
            try:
                self.broker.close()
            except Exception:
                log.exception("broker close failed")
        if self._pump is not None:
            self._pump.join(timeout=1.0)
        for closer in self._closers:
            try:
                closer()
            except Exception:
                log.exception("close after the broker failed")
