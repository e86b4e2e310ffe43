"""The cuda backend: the ONE module that calls cuMem* (through cuda.bindings.driver).

Every call is checked once here: a driver error becomes VmmError naming the
CUDA error (CUDA_ERROR_INVALID_VALUE...), an out-of-memory while creating a
page becomes DeviceOutOfMemory; nothing aborts the process. cuda-python's
driver calls run without the GIL, so the pool's refill thread never stalls
the thread that launches kernels.

Unmapped addresses are backed by one read-only zero page (a handle of the
page size, zeroed once). Measured on the H100 (benchmarks/vmm_driver_costs.py,
per mapping, 2-32 MiB alike): map 2 us, set access 27-29 us, unmap 19-20 us
(0.5 us if no access was ever set), release 15-30 us. cuMemUnmap and
cuMemSetAccess may span adjacent mappings, but cost the same per mapping when
they do: spanning a run only saves Python calls. Swapping the zero page in and
out thus doubles the driver work of a map or a give-back; VirtualTensor moves
it off the measured path where its caller vouches that is safe.
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

try:
    from cuda.bindings import driver as cu
except ImportError:  # cuda-python before 12.6 named the module cuda.cuda
    from cuda import cuda as cu  # type: ignore[no-redef]

from kvcached.config import KvcachedConfig
from kvcached.errors import BackendUnavailable, ClosedError, DeviceOutOfMemory, VmmError
from kvcached.vmm import device_sync
from kvcached.vmm.backend import VmmBackend

_SUCCESS = cu.CUresult.CUDA_SUCCESS
_OUT_OF_MEMORY = cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY
READ_WRITE = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
READ_ONLY = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ


def check(call: str, result: tuple) -> Any:
    """Unpack a cuda-python result tuple; raise on any error but success."""
    err = result[0]
    if err != _SUCCESS:
        name = getattr(err, "name", str(err))
        if err == _OUT_OF_MEMORY and call == "cuMemCreate":
            raise DeviceOutOfMemory(f"cuMemCreate: {name}")
        raise VmmError(call, name)
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def device_count() -> int:
    """CUDA devices the driver sees; BackendUnavailable when the driver does not answer."""
    try:
        err = cu.cuInit(0)[0]
    except Exception as exc:  # no libcuda.so at all: cuda-python raises its own loader error
        raise BackendUnavailable(f"cuInit: the CUDA driver library did not load ({exc})") from exc
    if err != _SUCCESS:
        raise BackendUnavailable(f"cuInit: {getattr(err, 'name', err)}")
    return check("cuDeviceGetCount", cu.cuDeviceGetCount())


def allocation_prop(device: int) -> cu.CUmemAllocationProp:
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device
    return prop


def access_desc(device: int, flags: Any) -> cu.CUmemAccessDesc:
    desc = cu.CUmemAccessDesc()
    desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = device
    desc.flags = flags
    return desc


class CudaBackend(VmmBackend):
    """CUDA VMM on one device, in the device's primary context (the one torch uses)."""

    name = "cuda"

    def __init__(self, config: KvcachedConfig) -> None:
        if device_count() <= config.device:
            raise BackendUnavailable(f"no CUDA device {config.device}")
        self.ordinal = config.device
        self.device = torch.device("cuda", config.device)
        self._dev = check("cuDeviceGet", cu.cuDeviceGet(config.device))
        self._ctx = check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(self._dev))
        self._local = threading.local()
        self._ensure_context()
        self._prop = allocation_prop(config.device)
        self._rw = [access_desc(config.device, READ_WRITE)]
        self._ro = [access_desc(config.device, READ_ONLY)]
        self.granularity = check("cuMemGetAllocationGranularity", cu.cuMemGetAllocationGranularity(
            self._prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
        page_size = config.page_size_for("cuda")
        if page_size % self.granularity:
            raise BackendUnavailable(f"page_size {page_size} is not a multiple of the "
                                     f"device granularity {self.granularity}")
        self.zero_page_size = page_size
        self._closed = False
        self._zero = self._make_zero_page()

    # -- address ranges ---------------------------------------------------
    def reserve(self, size: int) -> int:
        self._ensure_context()
        self._check_size("cuMemAddressReserve", size, self.zero_page_size)
        addr = int(check("cuMemAddressReserve",
                         cu.cuMemAddressReserve(size, self.zero_page_size, 0, 0)))
        try:
            self.map_zero(addr, size)
        except VmmError:
            cu.cuMemAddressFree(addr, size)
            raise
        return addr

    def free_reservation(self, addr: int, size: int) -> None:
        self._ensure_context()
        check("cuMemUnmap", cu.cuMemUnmap(addr, size))  # the zero page, everywhere
        check("cuMemAddressFree", cu.cuMemAddressFree(addr, size))

    # -- physical pages ---------------------------------------------------
    def create_page(self, size: int) -> Any:
        self._ensure_context()
        self._check_size("cuMemCreate", size, self.granularity)
        return check("cuMemCreate", cu.cuMemCreate(size, self._prop, 0))

    def release_page(self, handle: Any) -> None:
        self._ensure_context()
        check("cuMemRelease", cu.cuMemRelease(handle))

    # -- mapping ----------------------------------------------------------
    def map_pages(self, addr: int, handles: Sequence[Any], size: int, bare: bool = False) -> None:
        self._ensure_context()
        total = len(handles) * size
        if not bare:  # the zero page: one call for the run (it still costs per mapping)
            check("cuMemUnmap", cu.cuMemUnmap(addr, total))
        self._map_run(addr, handles, size, self._rw)

    def unmap_pages(self, addr: int, count: int, size: int, restore_zero: bool = True) -> None:
        self._ensure_context()
        total = count * size
        check("cuMemUnmap", cu.cuMemUnmap(addr, total))
        if restore_zero:
            self.map_zero(addr, total)

    def map_zero(self, addr: int, size: int) -> None:
        self._ensure_context()
        step = self.zero_page_size
        for at in range(addr, addr + size, step):
            check("cuMemMap", cu.cuMemMap(at, step, 0, self._zero, 0))
        check("cuMemSetAccess", cu.cuMemSetAccess(addr, size, self._ro, 1))

    def _map_run(self, addr: int, handles: Sequence[Any], size: int, access: list) -> None:
        """Map handles over a bare run and set access in one call; on failure the
        zero page is put back over the whole run (all or nothing)."""
        mapped = 0
        try:
            for i, handle in enumerate(handles):
                check("cuMemMap", cu.cuMemMap(addr + i * size, size, 0, handle, 0))
                mapped += 1
            check("cuMemSetAccess", cu.cuMemSetAccess(addr, len(handles) * size, access, 1))
        except VmmError:
            if mapped:
                cu.cuMemUnmap(addr, mapped * size)
            self.map_zero(addr, len(handles) * size)
            raise

    # -- the rest ---------------------------------------------------------
    def synchronize(self) -> None:
        self._ensure_context()
        with device_sync.exclusive():   # never during another thread's graph capture (device_sync says why)
            check("cuCtxSynchronize", cu.cuCtxSynchronize())

    def total_bytes(self) -> int:
        return int(check("cuDeviceTotalMem", cu.cuDeviceTotalMem(self._dev)))

    def close(self) -> None:
        if self._closed:
            return
        self._ensure_context()   # before _closed: a thread that never used the backend (shutdown's) makes it current
        self._closed = True
        check("cuMemRelease", cu.cuMemRelease(self._zero))
        check("cuDevicePrimaryCtxRelease", cu.cuDevicePrimaryCtxRelease(self._dev))

    def _make_zero_page(self) -> Any:
        """One page, zeroed once through a temporary read/write mapping."""
        size = self.zero_page_size
        handle = self.create_page(size)
        addr = int(check("cuMemAddressReserve", cu.cuMemAddressReserve(size, size, 0, 0)))
        try:
            check("cuMemMap", cu.cuMemMap(addr, size, 0, handle, 0))
            check("cuMemSetAccess", cu.cuMemSetAccess(addr, size, self._rw, 1))
            check("cuMemsetD8", cu.cuMemsetD8(addr, 0, size))
            check("cuCtxSynchronize", cu.cuCtxSynchronize())
            check("cuMemUnmap", cu.cuMemUnmap(addr, size))
        finally:
            cu.cuMemAddressFree(addr, size)
        return handle

    def _ensure_context(self) -> None:
        """Make the primary context current once per thread (the refill thread too)."""
        if getattr(self._local, "ready", False):
            return
        if getattr(self, "_closed", False):
            raise ClosedError("cuda backend: used after close()")
        check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self._ctx))
        self._local.ready = True

    @staticmethod
    def _check_size(call: str, size: int, unit: int) -> None:
        if size <= 0 or size % unit:
            raise VmmError(call, "CUDA_ERROR_INVALID_VALUE",
                           f"size {size} is not a positive multiple of {unit}")
