"""Loaded models: load on first request, idle unload after keep_alive, and the control verbs.

One ModelManager per daemon. A request takes a Lease on a model (loading it
first when needed, once, however many requests wait); while any lease is held
the model is never unloaded. When the last lease ends, the model expires after
its keep_alive; a reaper task unloads expired models.

keep_alive follows Ollama (default 5 minutes; 0 = unload when done) with one
rule of ours: a client can ask for less than the user's setting, never for
more. Zed sends -1 ("forever") on every request; taking that literally would
pin the model against the user's own settings. The broker's reclaim under
pressure acts on the engines directly and is never blocked by keep_alive.

Engine calls block (file reads, native code), so they run on worker threads;
the event loop only keeps the books.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from anyio import to_thread

from app.models.broker_link import BrokerLink
from app.models.events import EventHub
from app.settings import Settings
from engines.base import Engine, ModelInfo
from engines.errors import LoadTimeout, ModelNotFound
from engines.types import GenerateRequest, LoadProgress, ModelState

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 1.0
# A worker with work and no progress this long is reported with every thread's stack
# (a long prompt on the CPU takes seconds a step, never a minute).
WORKER_STALL_S = 60.0
EngineFactory = Callable[[ModelInfo], Engine]


@dataclass
class Loaded:
    """A model with an engine, and the books the manager keeps on it."""
    info: ModelInfo
    engine: Engine
    keep_alive_s: float
    loaded_at: float = field(default_factory=time.time)
    active: int = 0                                    # leases held
    expires_at: float = math.inf                       # time.time(); inf while leased
    requests: dict[str, GenerateRequest] = field(default_factory=dict)  # by request_id
    unload_when_idle: bool = False                     # keep_alive 0 arrived while it served

    @property
    def name(self) -> str:
        return self.info.name


class Lease:
    """A request's hold on a loaded model; release() exactly once (idempotent)."""

    def __init__(self, manager: "ModelManager", loaded: Loaded, keep_alive_s: float) -> None:
        self.manager = manager
        self.loaded = loaded
        self.keep_alive_s = keep_alive_s
        self.keep_alive_cut: str | None = None   # said to the client when its keep_alive was cut
        self.load_ns = 0
        self._released = False
        self._requests: list[GenerateRequest] = []

    @property
    def engine(self) -> Engine:
        return self.loaded.engine

    def track(self, request: GenerateRequest) -> None:
        """Remember a request so shutdown and unload can cancel it."""
        self._requests.append(request)
        self.loaded.requests[request.request_id] = request

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.manager._release(self)


class ModelManager:
    def __init__(self, registry, make_engine: EngineFactory, settings: Settings,
                 hub: EventHub, broker: BrokerLink | None = None) -> None:
        self.registry = registry
        self.make_engine = make_engine
        self.settings = settings
        self.hub = hub
        self.broker = broker or BrokerLink(None)
        self.broker.in_use = self._leased
        self._loaded: dict[str, Loaded] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loading: dict[str, asyncio.Task] = {}   # loads under way, shared by their waiters
        self._reaper: asyncio.Task | None = None
        # Engine unloads running in threads: a model has left `loaded()` before its unload
        # ends, and cancelling the task that awaits it (the reaper at shutdown) does not stop
        # the thread, so close() waits for these.
        self._unloads: set[asyncio.Future] = set()
        self._watchdog = None     # kvcached.broker.watchdog.Watchdog, from start()
        self._closing = False
        self._cut_logged: set[tuple[str, float]] = set()

    # --- looking up -------------------------------------------------------------
    async def resolve(self, name: str | None) -> ModelInfo:
        """The registry's model for a client's name ("" or None: the default model)."""
        wanted = name or self.settings.default_model
        if not wanted:
            return await to_thread.run_sync(self.registry.default)
        return await to_thread.run_sync(self.registry.get, wanted)

    def loaded(self) -> list[Loaded]:
        return list(self._loaded.values())

    def find_loaded(self, name: str) -> Loaded | None:
        return self._loaded.get(name)

    def _leased(self, name: str) -> bool:
        """A request holds the model (from its lease, before its engine sees it)."""
        loaded = self._loaded.get(name)
        return loaded is not None and loaded.active > 0

    # --- leases -----------------------------------------------------------------
    async def lease(self, name: str | None, keep_alive_s: float | None = None) -> Lease:
        """Hold the model for one request, loading it first when needed."""
        info = await self.resolve(name)
        keep = self.effective_keep_alive(info.name, keep_alive_s)
        started = time.perf_counter_ns()
        loaded = await self._ensure_loaded(info)
        lease = Lease(self, loaded, keep)
        lease.keep_alive_cut = self._keep_alive_cut(info.name, keep_alive_s, keep)
        lease.load_ns = time.perf_counter_ns() - started
        loaded.active += 1
        loaded.expires_at = math.inf
        return lease

    def effective_keep_alive(self, name: str, requested_s: float | None) -> float:
        """The client's keep_alive, never longer than the user's (negative = "forever" = the user's)."""
        user = self.settings.model(name).keep_alive_s
        ceiling = self.settings.keep_alive_s if user is None else user
        ceiling = math.inf if ceiling < 0 else ceiling
        if requested_s is None or requested_s < 0:
            return ceiling
        return min(requested_s, ceiling)

    def _keep_alive_cut(self, name: str, requested_s: float | None, granted_s: float) -> str | None:
        """A note when the client asked to keep the model longer than the keep_alive setting allows
        (logged once per model and value: Zed sends -1 on every request)."""
        if requested_s is None or granted_s == math.inf:
            return None
        wanted = math.inf if requested_s < 0 else requested_s
        if wanted <= granted_s:
            return None
        note = (f"{'forever' if wanted == math.inf else f'{wanted:g} s'} asked, {granted_s:g} s granted: "
                f"the keep_alive setting (settings.toml or EBBTIDE_KEEP_ALIVE) is the ceiling")
        if (name, wanted) not in self._cut_logged:
            self._cut_logged.add((name, wanted))
            log.info("%s: keep_alive %s", name, note)
        return note

    def _release(self, lease: Lease) -> None:
        loaded = lease.loaded
        loaded.active = max(0, loaded.active - 1)
        for request in lease._requests:
            loaded.requests.pop(request.request_id, None)
        if loaded.active == 0:
            keep = 0.0 if loaded.unload_when_idle else lease.keep_alive_s
            loaded.keep_alive_s = keep
            loaded.expires_at = time.time() + keep
            if keep == 0 and not self._closing:
                asyncio.get_running_loop().create_task(self._unload_if_idle(loaded))

    async def _ensure_loaded(self, info: ModelInfo) -> Loaded:
        """The loaded model, loading it once however many requests wait for it. Each
        waits at most load_timeout_s (LoadTimeout: HTTP 503, retry); the load goes on
        in the background and a later request finds it done, or waits for it again."""
        loaded = self._loaded.get(info.name)
        if loaded is not None and loaded.engine.state is not ModelState.UNLOADED:
            return loaded
        task = self._loading.get(info.name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load_once(info))
            self._loading[info.name] = task
            task.add_done_callback(lambda t: self._loading.pop(info.name, None))
        timeout = self.settings.load_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            raise LoadTimeout(f"model {info.name} is still loading after {timeout:.0f} s (the GPU "
                              "may be short of memory); it goes on loading: retry later") from None

    async def _load_once(self, info: ModelInfo) -> Loaded:
        lock = self._locks.setdefault(info.name, asyncio.Lock())
        async with lock:  # one load per model, however many requests wait for it
            loaded = self._loaded.get(info.name)
            if loaded is not None and loaded.engine.state is not ModelState.UNLOADED:
                return loaded
            if loaded is not None:  # the broker unloaded it under pressure: load again, admitted
                await to_thread.run_sync(self._admitted_load, info.name, loaded.engine, None)
                self._publish_state(info.name, ModelState.LOADED, reason="reload")
                return loaded
            self._publish_state(info.name, ModelState.LOADING)
            loop = asyncio.get_running_loop()

            def progress(p: LoadProgress) -> None:
                loop.call_soon_threadsafe(lambda: self.hub.publish(
                    "progress", model=p.model, fraction=p.fraction, stage=p.stage))

            try:
                engine = await to_thread.run_sync(self._load_engine, info, progress)
            except BaseException:
                self._publish_state(info.name, ModelState.UNLOADED)
                raise
            loaded = Loaded(info, engine, self.settings.keep_alive_s)
            self._loaded[info.name] = loaded
            self._publish_state(info.name, ModelState.LOADED)
            log.info("loaded %s (%s engine)", info.name, engine.kind)
            return loaded

    def _load_engine(self, info: ModelInfo, progress) -> Engine:
        from engines.factory import load_with_fallback

        return load_with_fallback(self.make_engine(info), progress,
                                  load=lambda engine, p: self._admitted_load(info.name, engine, p))

    def _admitted_load(self, name: str, engine: Engine, progress) -> None:
        """A load the broker makes room for first (pause, then unload, idle models); it
        waits up to admission_timeout_s for busy ones (BrokerLink.load)."""
        self.broker.load(name, engine, self.settings.models.get(name), progress,
                         wait_s=self.settings.admission_timeout_s)

    # --- verbs for the control API ---------------------------------------------
    def _require(self, name: str) -> Loaded:
        loaded = self._loaded.get(name)
        if loaded is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        return loaded

    async def pause(self, name: str) -> int:
        loaded = self._require(name)
        freed = await to_thread.run_sync(loaded.engine.pause)
        self._publish_state(name, ModelState.PAUSED, bytes_returned=freed, reason="manual")
        return freed

    async def weights_to_host(self, name: str) -> int:
        """Nothing of the model left on the GPU, ready again at copy speed (the torch engine's
        weights rung); an engine without that rung is paused instead (its KV goes)."""
        engine = self._require(name).engine
        freed = await to_thread.run_sync(lambda: engine.weights_to_host() or engine.pause())
        self._publish_state(name, engine.state, bytes_returned=freed, reason="manual",
                            rung=engine.memory().rung(engine.state))
        return freed

    async def resume(self, name: str) -> None:
        loaded = self._require(name)
        await to_thread.run_sync(loaded.engine.resume)
        self._publish_state(name, ModelState.LOADED, reason="manual")

    async def reclaim(self, name: str) -> int:
        """The cheap steps for one model: trim unused KV pages, drop cached prefixes."""
        engine = self._require(name).engine
        freed = await to_thread.run_sync(lambda: engine.trim() + engine.drop_prefixes())
        self.hub.publish("reclaim", model=name, bytes_returned=freed, reason="manual")
        return freed

    async def reclaim_all(self) -> int:
        """Give back everything that can go now: the broker's whole ladder, else pause every model."""
        freed = await to_thread.run_sync(self.broker.reclaim_all)
        if freed is None:  # no broker: do the steps ourselves
            freed = 0
            for loaded in self.loaded():
                freed += await self.reclaim(loaded.name)
                freed += await self.pause(loaded.name)
        self.hub.publish("reclaim", model="*", bytes_returned=freed, reason="manual")
        return freed

    async def unload(self, name: str) -> int:
        """Unload now (the control API: the user asked), cancelling requests in flight."""
        loaded = self._require(name)
        return await self._unload(loaded)

    async def expire(self, name: str) -> int:
        """Ollama's keep_alive 0: unload once the requests in flight are done (now if none)."""
        loaded = self._loaded.get(name)
        if loaded is None:
            return 0
        if loaded.active:
            loaded.unload_when_idle = True
            return 0
        return await self._unload(loaded)

    async def _unload(self, loaded: Loaded) -> int:
        lock = self._locks.setdefault(loaded.name, asyncio.Lock())
        async with lock:
            if self._loaded.get(loaded.name) is not loaded:
                return 0
            for request in list(loaded.requests.values()):
                request.cancel()
            del self._loaded[loaded.name]
            self.broker.unregister(loaded.name, loaded.engine)
            work = asyncio.ensure_future(to_thread.run_sync(loaded.engine.unload))
            self._unloads.add(work)
            work.add_done_callback(self._unloads.discard)
            freed = await asyncio.shield(work)
            self._publish_state(loaded.name, ModelState.UNLOADED, bytes_returned=freed)
            log.info("unloaded %s (%d bytes)", loaded.name, freed)
            return freed

    async def _unload_if_idle(self, loaded: Loaded) -> None:
        if loaded.active == 0 and not loaded.engine.busy:
            await self._unload(loaded)

    # --- the reaper and shutdown -------------------------------------------------
    def start(self) -> None:
        from kvcached.broker.watchdog import Watchdog

        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())
        self._watchdog = Watchdog(self.watchdog_probes).start()

    def watchdog_probes(self) -> list:
        """The heartbeats the watchdog reads: the broker's sampling thread (restarted
        when it stops) and pressure reclaim, and each loaded model's worker (those two
        reported with every stack)."""
        from kvcached.broker.watchdog import Probe

        broker = self.broker.broker
        probes = broker.watchdog_probes() if broker is not None else []
        for loaded in self.loaded():
            probes.append(Probe(f"model {loaded.name}'s worker", loaded.engine.stalled_s, WORKER_STALL_S))
        return probes

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            now = time.time()
            for loaded in self.loaded():
                if loaded.active == 0 and now >= loaded.expires_at and not loaded.engine.busy:
                    try:
                        await self._unload(loaded)
                    except Exception:  # one model failing to unload must not stop the reaper
                        log.exception("idle unload of %s failed", loaded.name)

    def cancel_all(self) -> None:
        """Stop every request in flight (shutdown): engines free their sequences."""
        for loaded in self.loaded():
            for request in list(loaded.requests.values()):
                request.cancel()

    async def close(self) -> None:
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
        if self._watchdog is not None:
            self._watchdog.stop()
        self.cancel_all()
        await asyncio.gather(*self._unloads, return_exceptions=True)
        for loaded in self.loaded():
            try:
                await self._unload(loaded)
            except Exception:
                log.exception("unload of %s at shutdown failed", loaded.name)
        self.broker.close()

    def _publish_state(self, name: str, state: ModelState, **extra: object) -> None:
        self.hub.publish("model", model=name, state=state.value, **extra)
