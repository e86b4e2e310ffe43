"""The memory broker: one per process and device.

A thread samples the device every `monitor_interval_s`; when others grow into
the headroom another (reclaimer.py) gives memory back, cheapest step first, from
the idlest and lowest-priority clients (the order is policy.py's, pure and
unit-tested): a verb that waits for its model never stops the samples.
Admission makes room for a client that asks for more (the cheap steps from any
other client, pause and unload from idle clients of lower priority), or
refuses with AdmissionDenied; a granted admission is committed (the client's
`commit` callback, under the broker's lock) before the next one is weighed,
so two clients are never promised the same bytes. Every step taken is an
Event in a bounded log that the control API and dashboard follow.

The monitor and the clients' verbs are passed in (CONVENTIONS 10), so unit
tests drive the broker with scripted memory and integration tests with a real
second process.

Locks: decisions (which steps, from whom) and admissions' commits are taken
under one lock; the clients' verbs run with NO broker lock held. A verb may
wait for its model's step or its requests in flight, and that model's worker
may be waiting in admit() for the broker meanwhile: holding the lock across
the verb deadlocked the daemon on the GPU (issue 15,
tests/engines/test_broker_deadlock.py). So two reclaims may act at once (the
pressure reclaim and an admission); each re-checks its step just before acting
and an admission re-reads what is free before it commits.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from kvcached.broker.client import STEP_ORDER, ClientSpec, ReclaimVerbs, Step
from kvcached.broker.events import Event, EventKind, EventLog, Subscription
from kvcached.broker.handle import ClientHandle
from kvcached.broker.host_relief import HostRelief
from kvcached.broker.monitor import Monitor, open_monitor
from kvcached.broker.reclaimer import PressureReclaimer
from kvcached.broker.sampler import SamplingThread
from kvcached.broker.sample import MemorySample
from kvcached.broker.watchdog import Probe
from kvcached.broker.policy import (Action, ClientView, Need, admission_need, admission_plan,
                                    admission_reclaimable, eligible, never_fits, plan, pressure_need)
from kvcached.config import KvcachedConfig
from kvcached.errors import AdmissionDenied, ConfigError, DoesNotFit, InvalidArgument

log = logging.getLogger(__name__)
MiB = 1 << 20
MAX_ROUNDS_PER_TICK = 8   # reclaim rounds one sample may start before the next interval


class Broker:
    """Budgets, headroom, reclaim and admission for one device. Thread-safe."""

    def __init__(self, config: KvcachedConfig, monitor: Monitor | None = None, pool=None) -> None:
        self.config = config
        self.pool = pool
        self.events = EventLog(config.event_log_size)
        self._clients: dict[str, ClientHandle] = {}
        self._lock = threading.RLock()            # the registry
        self._reclaim_lock = threading.Lock()     # decisions and commits; never held across a verb
        self._pressure_acting = threading.Lock()  # a pressure reclaim's verbs are running (try-lock only)
        self._auto_yield = config.auto_yield
        self._last_sample: MemorySample | None = None
        self._is_short = False   # reclaim under pressure started and has not met its target yet
        self._sampler = SamplingThread(self._sample_and_kick, config.monitor_interval_s, self.sample_age_s)
        self._reclaimer = PressureReclaimer(self.tick)   # the pressure reclaim's own thread
        if monitor is None:
            # With a pool (the daemon's), the backend it was opened on; else the same
            # one decision open_backend makes.
            backend = pool.backend.name if pool is not None else _resolve_backend(config)
            monitor = open_monitor(backend, config.device, self.held_bytes)
        self.monitor = monitor
        # The host's own memory, watched beside the device's (host_relief.py).
        self.host_relief = HostRelief(self, config.host_low_bytes) if config.host_low_bytes else None

    # --- clients ---------------------------------------------------------------
    def register(self, spec: ClientSpec, verbs: ReclaimVerbs) -> ClientHandle:
        try:
            handle = ClientHandle(self, spec, verbs)
        except ConfigError as exc:
            raise ConfigError(f"client {spec.name}: {exc}") from exc
        with self._lock:
            if spec.name in self._clients:
                raise ConfigError(f"client {spec.name!r} is already registered")
            self._clients[spec.name] = handle
        log.info("broker: client %s registered (priority %d)", spec.name, spec.priority)
        return handle

    def unregister(self, client: ClientHandle | str) -> None:
        name = client if isinstance(client, str) else client.name
        with self._lock:
            self._clients.pop(name, None)

    def clients(self) -> list[ClientHandle]:
        with self._lock:
            return list(self._clients.values())

    def _resolve(self, client: ClientHandle | str) -> ClientHandle:
        name = client if isinstance(client, str) else client.name
        with self._lock:
            if name not in self._clients:
                raise InvalidArgument(f"client {name!r} is not registered")
            return self._clients[name]

    def held_bytes(self) -> int:
        """What this process holds as the broker counts it: clients plus the pool's reserve."""
        held = sum(h.verbs.held_bytes() for h in self.clients())
        return held + (self.pool.reserved() if self.pool is not None else 0)

    @contextlib.contextmanager
    def between_reclaims(self) -> Iterator[None]:
        """Hold off admissions' commits and reclaim decisions meanwhile. An admission
        moves bytes between two clients (one gives back, then the other is granted):
        read inside this, a sum over clients never counts those bytes twice (a verb
        may be halfway, which only counts them once). Never call the broker's own
        verbs (admit, reclaim) inside it."""
        with self._reclaim_lock:
            yield

    # --- the threads (sampler.py, reclaimer.py) ----------------------------------
    def start(self) -> "Broker":
        if self._sampler.thread is None:
            self._reclaimer.start()
            self._sampler.start()
            if self.host_relief is not None:
                self.host_relief.start()
        return self

    def stop(self) -> None:
        self._sampler.stop()
        self._reclaimer.stop()
        if self.host_relief is not None:
            self.host_relief.stop()

    def sample_age_s(self) -> float | None:
        """Seconds since the monitor's last sample (None before the first): a sampling
        thread that stopped shows here first."""
        sample = self._last_sample
        return None if sample is None else sample.age_s()

    def watchdog_probe(self, limit_s: float | None = None) -> Probe:
        """The sampling thread's heartbeat for a Watchdog: its sample age, restarted past
        `limit_s` (default: 20 intervals, at least 5 s)."""
        limit = limit_s if limit_s is not None else max(5.0, 20 * self.config.monitor_interval_s)
        return self._sampler.probe(limit)

    def close(self) -> None:
        self.stop()
        self.monitor.close()

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def watchdog_probes(self) -> list[Probe]:
        """The sampling thread's heartbeat (restarted when it stops) and the pressure
        reclaim's (reported when one runs past its limit: reclaimer.py)."""
        return [self.watchdog_probe(), self._reclaimer.probe()]

    def _sample_and_kick(self) -> None:
        """The sampling thread's round: sample, and where others are in the headroom start
        the pressure reclaim (tick) on its own thread; no verb runs here, so the samples
        go on while a verb waits for its model (reclaimer.py says why)."""
        sample = self.sample()
        if self.auto_yield and self._pressure_need(sample).is_needed:
            self._reclaimer.kick()

    def _pressure_need(self, sample: MemorySample) -> Need:
        """What the headroom asks of a reclaim now (policy.pressure_need, this broker's settings)."""
        return pressure_need(sample, self.config.headroom_bytes, self.config.reclaim_hysteresis_bytes,
                             is_reclaiming=self._is_short)

    def tick(self) -> int:
        """Sample; while others are in the headroom, reclaim and sample again at once
        (an application that is growing has usually taken what one round gave back
        by the time it ends, and waiting a whole interval would only delay it),
        until headroom + reclaim_hysteresis_bytes are free. Returns bytes given back."""
        got = 0
        for _ in range(MAX_ROUNDS_PER_TICK):
            sample = self.sample()
            if not self.auto_yield:
                return got
            need = self._pressure_need(sample)
            # Short of the target, not merely under PSI pressure: aim at the target until met.
            self._is_short = need.is_needed and need.steps == STEP_ORDER
            if not need.is_needed:
                return got
            # One pressure reclaim acts at a time (the reclaimer's thread, or a caller's tick).
            if not self._pressure_acting.acquire(blocking=False):
                return got
            try:
                with self._reclaim_lock:
                    actions = plan(self._views(), need.steps, has_pool=self.pool is not None)
                returned = self._run(actions, need.bytes, "pressure")   # no lock: see the docstring
            finally:
                self._pressure_acting.release()
            got += returned
            if returned == 0:
                # Nothing left to give: wait for the next interval, and start again only
                # below the headroom (not at every sample between headroom and target).
                self._is_short = False
                break
        return got

    def sample(self) -> MemorySample:
        sample = self.monitor.sample()
        self._last_sample = sample
        return sample

    # --- reclaim and admission ---------------------------------------------------
    def reclaim(self, target_bytes: int | None = None, client: ClientHandle | str | None = None,
                steps: Sequence[Step] = STEP_ORDER) -> int:
        """Give memory back now (the tray's "give back all now"): every allowed step,
        or until `target_bytes` came back; from one client, or from all. Returns bytes."""
        if target_bytes is not None and target_bytes < 0:
            raise InvalidArgument(f"target_bytes: {target_bytes} must be >= 0")
        need = target_bytes if target_bytes is not None else float("inf")
        with self._reclaim_lock:
            if client is not None:
                handle = self._resolve(client)
                actions = plan([handle.view()], steps, has_pool=False)
            else:
                actions = plan(self._views(), steps, has_pool=self.pool is not None)
        return self._run(actions, need, "manual")

    def admit(self, client: ClientHandle | str, nbytes: int,
              commit: Callable[[int], None] | None = None, load: bool = False) -> int:
        """Make room for `nbytes` more for `client`: within its maximum, the budget and
        the headroom, reclaiming from other clients if needed. Returns bytes reclaimed;
        AdmissionDenied (nothing taken) when that cannot be enough now. `commit(nbytes)`
        runs under the broker's lock once admitted: the client counts the bytes in its
        held_bytes there, so the next admission (another client's) already sees them.
        `load`: the bytes are a model's load (idle clients of equal priority make room
        too; DoesNotFit, before anything is taken, when no reclaim could ever make it).
        Call it holding none of the engine's own locks (client.py says why)."""
        handle = self._resolve(client)
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise InvalidArgument(f"nbytes: {nbytes!r} must be an int >= 0")
        spec = handle.spec
        start = time.perf_counter()
        got = 0
        for attempt in range(2):   # decide; act with no lock held; decide again and commit
            with self._reclaim_lock:
                held = int(handle.verbs.held_bytes())
                if spec.max_bytes is not None and held + nbytes > spec.max_bytes:
                    raise AdmissionDenied(f"client {spec.name}: {_mib(held)} held + {_mib(nbytes)} "
                                          f"asked exceeds its maximum of {_mib(spec.max_bytes)}")
                if load:
                    self._check_fits(spec.name, held + nbytes)
                need = self._admission_need(nbytes)
                if need == 0:
                    if commit is not None:
                        commit(nbytes)
                    break
                if attempt:
                    raise AdmissionDenied(f"client {spec.name}: reclaimed {_mib(got)} but "
                                          f"{_mib(need)} more are needed for {_mib(nbytes)}")
                actions = self._room_plan(handle, nbytes, need, load)
            got += self._run(actions, need, "admission")
        if got:  # an admission that took nothing is no news (one per request would flood the log)
            self.events.append(Event(spec.name, EventKind.ADMIT, 0, time.perf_counter() - start, "admission",
                                     f"{_mib(nbytes)} admitted after {_mib(got)} reclaimed"))
        return got

    def _check_fits(self, name: str, nbytes: int) -> None:
        """DoesNotFit when `nbytes` could never fit beside the others' pinned minimums."""
        budget = self.config.budget_bytes
        capacity = budget if budget is not None else self.sample().total_bytes - self.config.headroom_bytes
        if never_fits(self._views(), capacity, nbytes, name):
            where = f"the budget of {_mib(budget)} (budget_bytes)" if budget is not None else \
                f"the device's {_mib(capacity)} less the headroom"
            raise DoesNotFit(f"{name} needs {_mib(nbytes)}: more than {where} holds, even with every "
                             "other model given back to its pinned minimum")

    def _room_plan(self, handle: ClientHandle, nbytes: int, need: int, load: bool = False) -> list[Action]:
        """The steps that can make `need` bytes of room for an admission; AdmissionDenied,
        before taking anything, when the other clients cannot give enough now (what is
        in the way named: busy or outranking clients)."""
        spec = handle.spec
        views = self._views()
        pool_bytes = self.pool.reserved() if self.pool is not None else 0
        can = admission_reclaimable(views, spec.priority, spec.name, load) + pool_bytes
        if can < need:
            kept = ", ".join(f"{v.name} ({_mib(v.held_bytes)}, {'busy' if v.is_busy else f'priority {v.priority}'})"
                             for v in views if v.name != spec.name and v.held_bytes > 0)
            raise AdmissionDenied(
                f"client {spec.name}: {_mib(nbytes)} asked needs {_mib(need)} reclaimed, but the "
                f"others' cached KV and idle clients of {'equal or ' if load else ''}lower priority than "
                f"{spec.priority} can give at most {_mib(can)}; in the way: {kept or 'nothing else'}")
        return admission_plan(views, spec.priority, spec.name, has_pool=self.pool is not None, load=load)

    def _admission_need(self, nbytes: int) -> int:
        views = self._views()
        return admission_need(self.sample(), self.config.headroom_bytes, self.config.budget_bytes,
                              sum(v.held_bytes for v in views), nbytes,
                              sum(v.booked_bytes for v in views))

    def _views(self) -> list[ClientView]:
        return [h.view() for h in self.clients()]

    def _run(self, actions: list[Action], need: float, reason: str) -> int:
        """Take actions in order until `need` bytes came back; each one is an Event."""
        got = 0
        for action in actions:
            if got >= need:
                break
            got += self._act(action, reason)
        return got

    def _act(self, action: Action, reason: str) -> int:
        start = time.perf_counter()
        detail = ""
        try:
            if action.step is Step.POOL:
                returned = self.pool.shrink()
            else:
                with self._lock:
                    handle = self._clients.get(action.client)
                # Re-check just before acting: the client may have become busy, or an
                # earlier step (trim) may have left nothing for this one to take.
                if handle is None or not eligible(handle.view(), action.step):
                    return 0
                returned = int(handle.steps[action.step]())
        except Exception as exc:  # a client's failure must not stop the rest of the reclaim
            log.warning("broker: %s of %s failed: %s", action.step.value, action.client, exc)
            returned, detail = 0, f"{type(exc).__name__}: {exc}"
        duration = time.perf_counter() - start
        if returned or detail or reason != "pressure":
            self.events.append(Event(action.client or "", EventKind(action.step.value), returned, duration,
                                     reason, detail))
        return returned

    # --- switches and reports -------------------------------------------------------
    def subscribe(self) -> Subscription:
        """Follow new events (the control API streams these); close() when done."""
        return self.events.subscribe()

    @property
    def auto_yield(self) -> bool:
        return self._auto_yield

    def set_auto_yield(self, enabled: bool) -> None:
        self._auto_yield = bool(enabled)
        self.events.append(Event("", EventKind.AUTO_YIELD, 0, 0.0, "manual", "on" if enabled else "off"))

    def snapshot(self) -> dict:
        """Device total/free/this process/others, and what each client holds."""
        sample = self._last_sample or self.sample()
        now = time.monotonic()
        clients = []
        for h in self.clients():
            v = h.view()
            clients.append({"name": v.name, "priority": v.priority, "min_bytes": v.min_bytes,
                            "max_bytes": h.spec.max_bytes, "held_bytes": v.held_bytes,
                            "cached_bytes": v.cached_bytes, "booked_bytes": v.booked_bytes,
                            "is_busy": v.is_busy, "idle_s": 0.0 if v.is_busy else now - v.idle_since})
        return {"device": {**sample.to_dict(), "monitor": self.monitor.name},
                "sample_age_s": round(sample.age_s(), 3),
                "headroom_bytes": self.config.headroom_bytes,
                "budget_bytes": self.config.budget_bytes,
                "auto_yield": self.auto_yield,
                "pool_reserved_bytes": self.pool.reserved() if self.pool is not None else 0,
                "pool_held_bytes": self.pool.held() if self.pool is not None else 0,
                "clients": clients}


def _resolve_backend(config: KvcachedConfig) -> str:
    from kvcached.vmm import resolve_backend  # imports torch: only for a broker without a pool

    return resolve_backend(config)


def _mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.0f} MiB"
