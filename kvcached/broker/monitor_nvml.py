"""The GPU monitor: NVML (nvidia-ml-py) for total, free, this process and others.

A memory query costs ~8 us, so sampling every 10-100 ms is free. NVML counts
VMM pages per process. Inside a container NVML may report host PIDs that do
not match ours; then "this process" falls back to what the broker's clients
hold, and everything else the device uses counts as others.
"""
from __future__ import annotations

import logging
import os

from kvcached.broker.sample import MemorySample, OursFn, others_from
from kvcached.errors import BackendUnavailable

log = logging.getLogger(__name__)


def _nvml():
    try:
        import pynvml
    except ImportError as exc:
        raise BackendUnavailable("NVML monitor needs nvidia-ml-py") from exc
    return pynvml


def _device_handle(nvml, device: int):
    """NVML's handle for CUDA device `device`; CUDA and NVML orders differ under
    CUDA_VISIBLE_DEVICES, so match by PCI bus id where torch tells it."""
    try:
        import torch

        props = torch.cuda.get_device_properties(device)
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return nvml.nvmlDeviceGetHandleByPciBusId_v2(bus_id.encode())
    except Exception as exc:  # no torch/CUDA or an old torch: NVML's own order
        log.debug("matching CUDA device %d by PCI bus id failed (%s); using NVML index", device, exc)
        return nvml.nvmlDeviceGetHandleByIndex(device)


class NvmlMonitor:
    name = "nvml"

    def __init__(self, device: int, ours: OursFn) -> None:
        self._nvml = _nvml()
        try:
            self._nvml.nvmlInit()
            self._handle = _device_handle(self._nvml, device)
        except self._nvml.NVMLError as exc:
            raise BackendUnavailable(f"NVML: {exc}") from exc
        self._ours = ours
        self._pid = os.getpid()
        self._closed = False

    def process_bytes(self) -> int | None:
        """This process's device memory by NVML, or None where NVML cannot tell."""
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nvml.NVMLError:
            return None
        for proc in procs:
            if proc.pid == self._pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return None

    def sample(self) -> MemorySample:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        total, free = int(info.total), int(info.free)
        ours = self.process_bytes()
        if ours is None:
            ours = self._ours()
        return MemorySample(total, free, ours, others_from(total, free, ours), None)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._nvml.nvmlShutdown()
