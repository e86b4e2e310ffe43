"""What the broker watches: the monitor that takes a memory sample (sample.py).

The broker takes its monitor as a parameter (CONVENTIONS 10): NVML on a GPU
(monitor_nvml), /proc on the host backend (monitor_host), a scripted source in
unit tests. open_monitor() chooses one by the VMM backend's name.
"""
from __future__ import annotations

from typing import Protocol

from kvcached.broker.sample import MemorySample, OursFn
from kvcached.errors import BackendUnavailable


class Monitor(Protocol):
    name: str

    def sample(self) -> MemorySample:
        """Read the device's memory now. Cheap (NVML ~8 us, /proc ~30 us)."""
        ...

    def close(self) -> None: ...


def open_monitor(backend_name: str, device: int, ours: OursFn) -> Monitor:
    """The monitor for a VMM backend: "cuda" -> NVML, "host" -> /proc."""
    if backend_name == "cuda":
        from kvcached.broker.monitor_nvml import NvmlMonitor
        return NvmlMonitor(device, ours)
    if backend_name == "host":
        from kvcached.broker.monitor_host import HostMonitor
        return HostMonitor(ours)
    raise BackendUnavailable(f"no memory monitor for backend {backend_name!r}")
