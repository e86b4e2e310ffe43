"""The broker's decisions, as pure functions: how much to reclaim, from whom,
in which order. No torch, no threads, no clock: inputs are a memory sample
and a snapshot of each client, so unit tests drive it with scripted memory.

Order: cheapest step first across all clients (pool, trim, drop prefixes,
pause, weights to host, unload); within a step, lowest priority first, then the idlest
(oldest idle_since). Busy clients are never paused or unloaded; a client with
a pinned minimum is never paused or unloaded, and is not trimmed when it
already holds no more than its minimum.

Admission (a client asks for more) may take the cheap steps (pool, trim, drop
cached prefixes: nothing running is lost) from ANY other client, whatever its
priority: three equal-priority models must be able to take each other's idle
prefixes. Pause and unload stay for idle clients of strictly lower priority,
except for a load (a model asked for that is not in memory): then idle
clients of equal priority also make room, the idlest first, as Ollama evicts
its least recently used model for the one a request names.
What admission counts on getting is what the steps can really give: a
client's `cached_bytes` (held KV that no running sequence needs) from the
cheap steps, everything it holds from pause/unload.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvcached.broker.client import (CHEAP_STEPS, CLIENT_STEPS, IDLE_ONLY_STEPS, STEP_ORDER,
                                    WHOLE_STEPS, Step)
from kvcached.broker.sample import MemorySample

# /proc/pressure/memory "some avg10" (%) from which the host is short of memory
# even while MemAvailable looks fine: then the cheap steps run.
PRESSURE_THRESHOLD = 10.0
PRESSURE_STEPS: tuple[Step, ...] = (Step.POOL, Step.TRIM, Step.DROP_PREFIXES)


@dataclass(frozen=True)
class ClientView:
    """One client as the policy sees it at one instant."""
    name: str
    priority: int
    min_bytes: int
    held_bytes: int
    is_busy: bool
    idle_since: float
    # Held KV that trim and drop_prefixes give back (no running sequence needs it);
    # None where the client cannot say (counted as nothing, steps still tried).
    cached_bytes: int | None = None
    # Bytes promised to the client (admitted) but not mapped yet: in held_bytes,
    # not yet in the device's used memory.
    booked_bytes: int = 0


@dataclass(frozen=True)
class Action:
    step: Step
    client: str | None      # None for the pool step


@dataclass(frozen=True)
class Need:
    """What a sample asks for: bytes to give back, through which steps."""
    bytes: int
    steps: tuple[Step, ...]

    @property
    def is_needed(self) -> bool:
        return self.bytes > 0


NO_NEED = Need(0, ())


def pressure_need(sample: MemorySample, headroom: int, hysteresis: int = 0,
                  is_reclaiming: bool = False) -> Need:
    """Others grew into the headroom: give back enough to leave headroom + hysteresis
    free, every step allowed. Reclaim starts below the headroom and, once started
    (`is_reclaiming`), goes on until the target is met: an app whose allocation
    failed is still short, and NVML cannot see what it asked for.
    PSI pressure alone: the cheap steps, as much as they give."""
    target = headroom + hysteresis
    trigger = target if is_reclaiming else headroom
    if sample.free_bytes < trigger:
        return Need(target - sample.free_bytes, STEP_ORDER)
    if sample.pressure is not None and sample.pressure >= PRESSURE_THRESHOLD:
        return Need(1, PRESSURE_STEPS)   # 1 byte: run the cheap steps once
    return NO_NEED


def admission_need(sample: MemorySample, headroom: int, budget: int | None,
                   clients_held: int, nbytes: int, booked: int = 0) -> int:
    """Bytes to reclaim so `nbytes` more fit in the budget and leave the headroom free.
    `booked`: bytes already promised to clients but not mapped yet (the device's free
    memory does not show them; promising them twice is how two models overshoot)."""
    over_budget = clients_held + nbytes - budget if budget is not None else 0
    over_device = headroom + nbytes + booked - sample.free_bytes
    return max(0, over_budget, over_device)


def eligible(view: ClientView, step: Step) -> bool:
    if view.held_bytes <= 0:
        return False
    if step in IDLE_ONLY_STEPS and view.is_busy:
        return False
    if step in WHOLE_STEPS:
        return view.min_bytes == 0
    return view.held_bytes > view.min_bytes


def eligible_for_admission(view: ClientView, step: Step, priority: int, load: bool = False) -> bool:
    """May an admission at `priority` take `step` from this (other) client? The cheap
    steps from anyone; pause and unload only from idle clients of lower priority (of
    equal priority too, for a load)."""
    if step in CHEAP_STEPS:
        return view.cached_bytes != 0 and eligible(view, step)
    outranked = view.priority <= priority if load else view.priority < priority
    return outranked and eligible(view, step)


def victim_order(views: Iterable[ClientView]) -> list[ClientView]:
    """Lowest priority first, then idle before busy, then the longest idle."""
    return sorted(views, key=lambda v: (v.priority, v.is_busy, v.idle_since, v.name))


def plan(views: Sequence[ClientView], steps: Sequence[Step] = STEP_ORDER,
         below_priority: int | None = None, exclude: str | None = None,
         has_pool: bool = True) -> list[Action]:
    """Every action that could give memory back, in the order to try them.
    The broker runs them until the need is met. `below_priority`: only clients
    of strictly lower priority (admission); `exclude`: never this client."""
    victims = [v for v in victim_order(views)
               if v.name != exclude and (below_priority is None or v.priority < below_priority)]
    actions: list[Action] = []
    for step in steps:
        if step is Step.POOL:
            if has_pool:
                actions.append(Action(Step.POOL, None))
            continue
        assert step in CLIENT_STEPS
        actions.extend(Action(step, v.name) for v in victims if eligible(v, step))
    return actions


def admission_plan(views: Sequence[ClientView], priority: int, exclude: str,
                   has_pool: bool = True, load: bool = False) -> list[Action]:
    """What an admission for client `exclude` at `priority` may take, cheapest first."""
    victims = [v for v in victim_order(views) if v.name != exclude]
    actions: list[Action] = [Action(Step.POOL, None)] if has_pool else []
    for step in CLIENT_STEPS:
        actions.extend(Action(step, v.name) for v in victims
                       if eligible_for_admission(v, step, priority, load))
    return actions


def never_fits(views: Sequence[ClientView], capacity: int, nbytes: int, exclude: str) -> bool:
    """Could `nbytes` for client `exclude` not fit even with every other client given
    back down to its pinned minimum? `capacity`: the budget, or the device less the headroom."""
    pinned = sum(v.min_bytes for v in views if v.name != exclude)
    return nbytes > capacity - pinned


def admission_reclaimable(views: Sequence[ClientView], priority: int, exclude: str,
                          load: bool = False) -> int:
    """What admission_plan can be counted on to give back: never more than the steps
    really give (a busy client's running KV is not reclaimable; an unknown cache is 0)."""
    total = 0
    for v in views:
        if v.name == exclude:
            continue
        if eligible_for_admission(v, Step.UNLOAD, priority, load):
            total += v.held_bytes
        elif v.cached_bytes:
            total += min(v.cached_bytes, max(0, v.held_bytes - v.min_bytes))
    return total


def reclaimable_bytes(views: Sequence[ClientView], below_priority: int | None = None,
                      exclude: str | None = None) -> int:
    """An upper bound on what reclaim could give back: all a victim holds above
    its minimum (everything, for an idle unpinned client)."""
    total = 0
    for v in views:
        if v.name == exclude or (below_priority is not None and v.priority >= below_priority):
            continue
        whole = not v.is_busy and v.min_bytes == 0
        total += v.held_bytes if whole else max(0, v.held_bytes - v.min_bytes)
    return total
