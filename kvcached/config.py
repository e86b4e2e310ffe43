"""The one configuration object of kvcached, validated when it is made.

It is passed down through constructors (backend, pool, KV cache, broker);
nothing here is read from globals or the environment. Values measured at run
time (granularity, device total) live on the objects that measure them.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvcached.errors import ConfigError

MiB = 1 << 20
GiB = 1 << 30
BACKENDS = ("auto", "cuda", "host")

# The page size when the config names none, by the backend that runs.
# GPU, 32 MiB: what a page costs the driver follows the number of mappings, not
# bytes (~45 us a mapping on the H100 and H200 alike), so at 2 MiB the edge the
# product promises was missed at its defaults: yielding 8 GiB took 574 ms and
# pause/resume ran at 0.35x/0.45x of raw pinned copies; at 32 MiB, 232 ms and
# 0.91x/0.99x (H200, benchmarks/results/yield*.json, issue 15). The cost: a
# sequence's first page is 32 MiB, so a small model's first token maps one
# 32 MiB page (one mapping, ~45 us, as for 2 MiB) and a slot holds up to 31 MiB
# it does not use yet (SmolLM2-135M: 32 MiB is ~1,450 tokens of its KV; 8 slots
# at most 256 MiB, given back by trim like any page). Host, 2 MiB: a host page is
# zero-filled when mapped (the cost follows bytes there), and the CI budgets
# are small.
DEFAULT_PAGE_SIZES = {"cuda": 32 * MiB, "host": 2 * MiB}


@dataclass(frozen=True)
class KvcachedConfig:
    backend: str = "auto"               # "auto": cuda when a device and driver answer, else host
    device: int = 0                     # CUDA device ordinal
    page_size: int | None = None        # a multiple of the backend's granularity; None: by backend
    budget_bytes: int | None = None     # pages this process may hold; None: what the device allows
    reserve_pages: int = 4              # pre-created pages kept ready for the hot path
    headroom_bytes: int = 1 * GiB       # kept free for other applications
    # Reclaim that pressure starts aims this far above the headroom: another app's
    # failed allocation is invisible to NVML, so giving back only the shortfall left
    # a growing app (512 MiB steps) failing, and each round costs a step of the models.
    reclaim_hysteresis_bytes: int = 512 * MiB
    monitor_interval_s: float = 0.05    # broker sampling period (<= 100 ms on the GPU)
    auto_yield: bool = True             # reclaim when others grow into the headroom
    event_log_size: int = 1000          # bounded broker event log
    # Host memory available (MemAvailable) below which idle models give host memory back:
    # paused KV to disk, kept pinned buffers freed (broker/host_relief.py); 0: never.
    host_low_bytes: int = 1 * GiB

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.page_size is not None and (self.page_size <= 0 or self.page_size % (64 * 1024)):
            raise ConfigError(f"page_size: {self.page_size} must be a positive multiple of 64 KiB")
        if self.budget_bytes is not None and self.budget_bytes < 0:
            raise ConfigError(f"budget_bytes: {self.budget_bytes} must be >= 0")
        if self.reserve_pages < 0:
            raise ConfigError(f"reserve_pages: {self.reserve_pages} must be >= 0")
        if self.headroom_bytes < 0:
            raise ConfigError(f"headroom_bytes: {self.headroom_bytes} must be >= 0")
        if self.reclaim_hysteresis_bytes < 0:
            raise ConfigError(f"reclaim_hysteresis_bytes: {self.reclaim_hysteresis_bytes} must be >= 0")
        if not 0.001 <= self.monitor_interval_s <= 10:
            raise ConfigError(f"monitor_interval_s: {self.monitor_interval_s} must be in [0.001, 10]")
        if self.host_low_bytes < 0:
            raise ConfigError(f"host_low_bytes: {self.host_low_bytes} must be >= 0")
        if self.event_log_size < 1:
            raise ConfigError(f"event_log_size: {self.event_log_size} must be >= 1")

    def page_size_for(self, backend: str) -> int:
        """The page size on `backend` ("cuda" | "host"): the configured one, else its default."""
        return self.page_size if self.page_size is not None else DEFAULT_PAGE_SIZES[backend]
