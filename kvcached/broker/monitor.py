"""What the broker watches: one memory sample of the device, and the monitor
that takes it.

A sample says how much memory the device has, how much is free, how much
this process holds and how much everyone else does. The broker takes its
monitor as a parameter (CONVENTIONS 10): NVML on a GPU (monitor_nvml), /proc
on the host backend (monitor_host), a scripted source in unit tests.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kvcached.errors import BackendUnavailable

OursFn = Callable[[], int]   # bytes this process's clients hold, as the broker counts them


@dataclass(frozen=True)
class MemorySample:
    total_bytes: int
    free_bytes: int
    ours_bytes: int             # this process
    others_bytes: int           # everyone else (total - free - ours, never below 0)
    pressure: float | None = None   # host: /proc/pressure/memory "some avg10" (%); None where unknown
    monotonic: float = field(default_factory=time.monotonic)

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "free_bytes": self.free_bytes,
                "ours_bytes": self.ours_bytes, "others_bytes": self.others_bytes,
                "pressure": self.pressure}


class Monitor(Protocol):
    name: str

    def sample(self) -> MemorySample:
        """Read the device's memory now. Cheap (NVML ~8 us, /proc ~30 us)."""
        ...

    def close(self) -> None: ...


def others_from(total: int, free: int, ours: int) -> int:
    return max(0, total - free - ours)


def open_monitor(backend_name: str, device: int, ours: OursFn) -> Monitor:
    """The monitor for a VMM backend: "cuda" -> NVML, "host" -> /proc."""
    if backend_name == "cuda":
        from kvcached.broker.monitor_nvml import NvmlMonitor
        return NvmlMonitor(device, ours)
    if backend_name == "host":
        from kvcached.broker.monitor_host import HostMonitor
        return HostMonitor(ours)
    raise BackendUnavailable(f"no memory monitor for backend {backend_name!r}")
