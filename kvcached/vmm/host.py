"""The host backend: the VMM contract on system RAM, for Linux.

Reserve = mmap(PROT_NONE). Physical pages = page-sized pieces of one sparse
memfd, allocated with fallocate (like cuMemCreate) and mapped
MAP_FIXED|MAP_SHARED|MAP_POPULATE read/write (like cuMemMap+cuMemSetAccess),
so the process RSS really rises. Unmapped pages = a second memfd, never
written, mapped PROT_READ over them (the shared read-only zero page); release
punches a hole in the piece so the memory really returns. Python's mmap module
cannot MAP_FIXED, so libc is called through ctypes (which drops the GIL).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from kvcached.config import KvcachedConfig
from kvcached.errors import BackendUnavailable, ClosedError, DeviceOutOfMemory, VmmError
from kvcached.rss import meminfo_bytes
from kvcached.vmm.backend import VmmBackend

PROT_NONE, PROT_READ, PROT_WRITE = 0x0, 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED = 0x01, 0x02, 0x10
MAP_ANONYMOUS, MAP_NORESERVE, MAP_POPULATE = 0x20, 0x4000, 0x8000
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
MAP_FAILED = ctypes.c_void_p(-1).value
OUT_OF_MEMORY_ERRNOS = (errno.ENOMEM, errno.ENOSPC)


@dataclass(frozen=True)
class HostHandle:
    """A physical page: `size` bytes at `offset` in the backend's data memfd."""

    offset: int
    size: int


def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.fallocate.restype = ctypes.c_int
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return libc


def _raise_errno(call: str, detail: str) -> None:
    code = ctypes.get_errno()
    name = errno.errorcode.get(code, str(code))
    raise VmmError(call, name, f"{os.strerror(code)}; {detail}")


class HostBackend(VmmBackend):
    """System RAM through memfd pieces; RSS rises on map and falls on unmap."""

    name = "host"

    def __init__(self, config: KvcachedConfig) -> None:
        if not hasattr(os, "memfd_create"):
            raise BackendUnavailable("host backend needs Linux memfd_create")
        self._libc = _load_libc()
        self.granularity = mmap.PAGESIZE
        self.zero_page_size = config.page_size_for("host")
        self.device = torch.device("cpu")
        self._lock = threading.Lock()
        self._free_slots: dict[int, list[int]] = {}   # size -> offsets free for reuse
        self._next_offset = 0
        self._file_size = 0
        self._data_fd = os.memfd_create("kvcached-pages", os.MFD_CLOEXEC)
        # The zero page: a sparse memfd never written, so every read of it is 0.
        self._zero_fd = os.memfd_create("kvcached-zero", os.MFD_CLOEXEC)
        os.ftruncate(self._zero_fd, self.zero_page_size)
        self._closed = False

    # -- address ranges ---------------------------------------------------
    def reserve(self, size: int) -> int:
        self._check_open()
        self._check_multiple("reserve", size, self.zero_page_size)
        addr = self._libc.mmap(None, size, PROT_NONE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if addr == MAP_FAILED or addr is None:
            _raise_errno("mmap", f"reserving {size} bytes")
        self.map_zero(addr, size)
        return addr

    def free_reservation(self, addr: int, size: int) -> None:
        if self._libc.munmap(addr, size) != 0:
            _raise_errno("munmap", f"freeing reservation {addr:#x}+{size}")

    # -- physical pages ---------------------------------------------------
    def create_page(self, size: int) -> HostHandle:
        self._check_open()
        self._check_multiple("create_page", size, self.granularity)
        if size > meminfo_bytes("MemAvailable"):
            raise DeviceOutOfMemory(f"host: {size} bytes exceed MemAvailable")
        offset = self._take_slot(size)
        if self._libc.fallocate(self._data_fd, 0, offset, size) != 0:
            code = ctypes.get_errno()
            self._give_slot(offset, size)
            if code in OUT_OF_MEMORY_ERRNOS:
                raise DeviceOutOfMemory(f"host: fallocate of {size} bytes: {os.strerror(code)}")
            raise VmmError("fallocate", errno.errorcode.get(code, str(code)), os.strerror(code))
        return HostHandle(offset, size)

    def release_page(self, handle: HostHandle) -> None:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if self._libc.fallocate(self._data_fd, mode, handle.offset, handle.size) != 0:
            _raise_errno("fallocate", f"punching page at offset {handle.offset}")
        self._give_slot(handle.offset, handle.size)

    # -- mapping ----------------------------------------------------------
    # MAP_FIXED replaces whatever is mapped at once, so `bare` changes nothing here.
    def map_pages(self, addr: int, handles: Sequence[HostHandle], size: int,
                  bare: bool = False) -> None:
        try:
            self._map_runs(addr, handles, size, PROT_READ | PROT_WRITE)
        except VmmError:
            self.map_zero(addr, len(handles) * size)  # all or nothing
            raise

    def unmap_pages(self, addr: int, count: int, size: int, restore_zero: bool = True) -> None:
        total = count * size
        if restore_zero:
            self.map_zero(addr, total)
            return
        # Bare, as on CUDA: no access at all until map_zero().
        got = self._libc.mmap(addr, total, PROT_NONE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0)
        if got != addr:
            _raise_errno("mmap", f"unmapping {total} bytes at {addr:#x}")

    def map_zero(self, addr: int, size: int) -> None:
        for at in range(addr, addr + size, self.zero_page_size):
            got = self._libc.mmap(at, self.zero_page_size, PROT_READ, MAP_SHARED | MAP_FIXED,
                                  self._zero_fd, 0)
            if got != at:
                _raise_errno("mmap", f"mapping the zero page at {at:#x}")

    def _map_runs(self, addr: int, handles: Sequence[HostHandle], size: int, prot: int) -> None:
        # Pieces adjacent in the file and in memory become one mmap (one VMA).
        i = 0
        while i < len(handles):
            j = i + 1
            while j < len(handles) and handles[j].offset == handles[i].offset + (j - i) * size:
                j += 1
            at = addr + i * size
            length = (j - i) * size
            got = self._libc.mmap(at, length, prot, MAP_SHARED | MAP_FIXED | MAP_POPULATE,
                                  self._data_fd, handles[i].offset)
            if got != at:
                _raise_errno("mmap", f"mapping {length} bytes at {at:#x}")
            i = j

    # -- the rest ---------------------------------------------------------
    def synchronize(self) -> None:
        """Nothing runs asynchronously on the host."""

    def total_bytes(self) -> int:
        return meminfo_bytes("MemTotal")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._data_fd)
        os.close(self._zero_fd)

    def _take_slot(self, size: int) -> int:
        with self._lock:
            free = self._free_slots.get(size)
            if free:
                return free.pop()
            offset = self._next_offset
            self._next_offset += size
            if self._next_offset > self._file_size:
                # Grow the sparse file in big steps: ftruncate allocates nothing.
                self._file_size = max(self._next_offset, 2 * self._file_size)
                os.ftruncate(self._data_fd, self._file_size)
            return offset

    def _give_slot(self, offset: int, size: int) -> None:
        with self._lock:
            self._free_slots.setdefault(size, []).append(offset)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("host backend: used after close()")

    @staticmethod
    def _check_multiple(call: str, size: int, unit: int) -> None:
        if size <= 0 or size % unit:
            raise VmmError(call, "EINVAL", f"size {size} is not a positive multiple of {unit}")
