"""What a broker client is: its spec, and the verbs it answers.

A client is one model (one engine). It registers with a name, a priority, a
pinned minimum and a maximum, and an object implementing ReclaimVerbs; the
broker calls those verbs from its own thread, so they must be thread-safe.
Engines must not hold their own locks while calling Broker.admit(): the broker
may call another engine's verbs to make room, and a verb waiting on a lock the
caller holds would deadlock.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvcached.errors import ConfigError


class Step(enum.Enum):
    """Reclaim steps, cheapest first (the order the broker takes them in)."""
    POOL = "pool"                    # release pooled pages nobody uses
    TRIM = "trim"                    # unmap pages that hold no live token
    DROP_PREFIXES = "drop_prefixes"  # forget cached prefixes of finished conversations
    PAUSE = "pause"                  # move live KV to host memory, unmap its pages
    WEIGHTS_TO_HOST = "weights_to_host"  # then the weights too, their addresses kept (ready at copy speed)
    UNLOAD = "unload"                # free the weights


STEP_ORDER: tuple[Step, ...] = tuple(Step)
CLIENT_STEPS: tuple[Step, ...] = (Step.TRIM, Step.DROP_PREFIXES, Step.PAUSE, Step.WEIGHTS_TO_HOST, Step.UNLOAD)
# Steps that give back everything a client holds: never on a client with a pinned minimum.
WHOLE_STEPS = frozenset({Step.PAUSE, Step.WEIGHTS_TO_HOST, Step.UNLOAD})
# Steps that lose nothing running: admission may take them from a client of any priority.
CHEAP_STEPS = frozenset({Step.POOL, Step.TRIM, Step.DROP_PREFIXES})
# Steps that would disturb a running request: never on a busy client.
IDLE_ONLY_STEPS = frozenset({Step.PAUSE, Step.WEIGHTS_TO_HOST, Step.UNLOAD})
StepFn = Callable[[], int]   # a client's reclaim verb: bytes given back


def _nothing() -> int:
    return 0


def step_functions(verbs: "ReclaimVerbs") -> dict[Step, StepFn]:
    """The callable each client step runs, taken from the verbs once, at registration
    (ConfigError naming what is missing). weights_to_host is optional: a client without
    it gives nothing at that rung, and the ladder goes on to unload."""
    try:
        table = {Step.TRIM: verbs.trim, Step.DROP_PREFIXES: verbs.drop_prefixes,
                 Step.PAUSE: verbs.pause, Step.WEIGHTS_TO_HOST: getattr(verbs, "weights_to_host", _nothing),
                 Step.UNLOAD: verbs.unload}
        for query in (verbs.held_bytes, verbs.is_busy, verbs.idle_since):
            if not callable(query):
                raise AttributeError(query)
    except AttributeError as exc:
        raise ConfigError(f"client verbs lack {exc}") from exc
    missing = [step.value for step, fn in table.items() if not callable(fn)]
    if missing:
        raise ConfigError(f"client verbs lack callables for {', '.join(missing)}")
    return table


@runtime_checkable
class ReclaimVerbs(Protocol):
    """What engines implement for the broker. Each reclaim verb returns bytes given back."""

    def held_bytes(self) -> int: ...

    def is_busy(self) -> bool: ...

    def idle_since(self) -> float:
        """time.monotonic() when the last request finished (now while busy)."""
        ...

    def trim(self) -> int: ...

    def drop_prefixes(self) -> int: ...

    def pause(self) -> int: ...

    def unload(self) -> int: ...

    # Optional (the broker reads them where present, see ClientHandle.view):
    #   weights_to_host() -> int: after pause, the weights to host memory too (bytes given
    #   back), ready again at copy speed; absent: that rung gives nothing;
    #   cached_bytes() -> int: held bytes that trim + drop_prefixes give back;
    #   booked_bytes() -> int: bytes admitted (in held_bytes) but not mapped yet.


@dataclass(frozen=True)
class ClientSpec:
    name: str
    priority: int = 0              # higher keeps its memory longer
    min_bytes: int = 0             # pinned: the broker never takes the client below this
    max_bytes: int | None = None   # admission refuses growth past this; None: no limit

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"client name: {self.name!r} must be a non-empty string")
        if self.min_bytes < 0:
            raise ConfigError(f"client {self.name}: min_bytes {self.min_bytes} must be >= 0")
        if self.max_bytes is not None and self.max_bytes < self.min_bytes:
            raise ConfigError(f"client {self.name}: max_bytes {self.max_bytes} < min_bytes {self.min_bytes}")
