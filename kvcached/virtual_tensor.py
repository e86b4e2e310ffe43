"""A torch tensor over a reserved virtual range whose physical pages come and go.

The range is reserved once, so the tensor's address never moves: kernels and
CUDA graphs captured over it stay valid while pages are mapped and unmapped
underneath. Unmapped pages read as zeros (the backend's shared read-only zero
page) and writes to them fault. Pages come from a PagePool; mapping adjacent
pages in one call lets the backend batch driver calls.
"""
from __future__ import annotations

import ctypes
import logging
import math
import threading
from typing import Callable, Sequence

import torch

from kvcached.errors import ClosedError, InvalidArgument
from kvcached.page_pool import Page, PagePool

log = logging.getLogger(__name__)


class _CudaArray:
    """The smallest object torch.as_tensor accepts for device memory it does not own."""

    def __init__(self, addr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "version": 3,
            "strides": None,
        }


def _bytes_on_host(addr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    buffer = (ctypes.c_char * nbytes).from_address(addr)
    return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes)


def _bytes_on_cuda(addr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(_CudaArray(addr, nbytes), device=device)


# A uint8 tensor over [addr, addr + nbytes), by device type.
_BYTE_VIEWS: dict[str, Callable[[int, int, torch.device], torch.Tensor]] = {
    "cpu": _bytes_on_host,
    "cuda": _bytes_on_cuda,
}


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted page indices -> (first, count) runs of adjacent pages."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


class VirtualTensor:
    """`shape`/`dtype` tensor over `num_pages` pages of `pool.page_size` bytes."""

    def __init__(self, pool: PagePool, shape: Sequence[int], dtype: torch.dtype) -> None:
        self.pool = pool
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        if any(d < 0 for d in self.shape):
            raise InvalidArgument(f"shape: {self.shape} has a negative dimension")
        self.nbytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()
        if self.nbytes == 0:
            raise InvalidArgument(f"shape: {self.shape} holds no elements")
        self.page_size = pool.page_size
        self.num_pages = -(-self.nbytes // self.page_size)
        self.reserved_bytes = self.num_pages * self.page_size
        self._backend = pool.backend
        self._pages: list[Page | None] = [None] * self.num_pages
        self._lock = threading.Lock()
        self._closed = False
        self.addr = self._backend.reserve(self.reserved_bytes)
        make_bytes = _BYTE_VIEWS[self._backend.device.type]
        raw = make_bytes(self.addr, self.reserved_bytes, self._backend.device)
        self.tensor = raw[: self.nbytes].view(dtype).view(self.shape)

    # -- by pages ---------------------------------------------------------
    def map_pages(self, first: int, count: int) -> int:
        """Map every unmapped page of [first, first+count); returns bytes newly mapped.
        All or nothing: on PoolExhausted/DeviceOutOfMemory nothing new stays mapped."""
        with self._lock:
            self._check(first, count)
            todo = [i for i in range(first, first + count) if self._pages[i] is None]
            pages: list[Page] = []
            try:
                for _ in todo:
                    pages.append(self.pool.acquire())
                by_index = dict(zip(todo, pages))
                for start, n in _runs(todo):
                    handles = [by_index[i].handle for i in range(start, start + n)]
                    self._backend.map_pages(self._addr_of(start), handles, self.page_size)
                    for i in range(start, start + n):
                        self._pages[i] = by_index[i]
            except BaseException:
                self._roll_back(todo, pages)
                raise
            return len(todo) * self.page_size

    def unmap_pages(self, first: int, count: int) -> int:
        """Unmap the mapped pages of [first, first+count), after synchronizing the
        device; returns the bytes handed back to the pool."""
        with self._lock:
            self._check(first, count)
            todo = [i for i in range(first, first + count) if self._pages[i] is not None]
            return self._unmap(todo)

    # -- by bytes ---------------------------------------------------------
    def map(self, offset: int, length: int) -> int:
        """Map every page intersecting [offset, offset+length) bytes."""
        return self.map_pages(*self._page_span(offset, length))

    def unmap(self, offset: int, length: int) -> int:
        """Unmap every page intersecting [offset, offset+length) bytes."""
        return self.unmap_pages(*self._page_span(offset, length))

    # -- queries ----------------------------------------------------------
    def is_mapped(self, page: int) -> bool:
        self._check(page, 1)
        return self._pages[page] is not None

    def mapped_pages(self) -> list[int]:
        return [i for i, p in enumerate(self._pages) if p is not None]

    @property
    def mapped_bytes(self) -> int:
        return sum(p is not None for p in self._pages) * self.page_size

    # -- life cycle -------------------------------------------------------
    def close(self) -> None:
        """Unmap every page and free the reservation; `.tensor` must not be used after."""
        with self._lock:
            if self._closed:
                return
            self._unmap(self.mapped_pages())
            self._closed = True
            self._backend.free_reservation(self.addr, self.reserved_bytes)

    def __enter__(self) -> "VirtualTensor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VirtualTensor(shape={self.shape}, dtype={self.dtype}, pages="
                f"{len(self.mapped_pages())}/{self.num_pages} of {self.page_size} bytes)")

    # -- inside -----------------------------------------------------------
    def _unmap(self, todo: list[int]) -> int:
        if not todo:
            return 0
        # A kernel still reading a page we unmap is an illegal-address crash.
        self._backend.synchronize()
        for start, n in _runs(todo):
            self._backend.unmap_pages(self._addr_of(start), n, self.page_size)
            for i in range(start, start + n):
                page, self._pages[i] = self._pages[i], None
                self.pool.release(page)
        return len(todo) * self.page_size

    def _roll_back(self, todo: list[int], pages: list[Page]) -> None:
        """Undo a failed map_pages: unmap what got mapped, return every page.
        (The backend's map_pages is itself all or nothing.)"""
        mapped = [i for i in todo if self._pages[i] is not None]
        assigned = {id(self._pages[i]) for i in mapped}
        self._unmap(mapped)
        for page in pages:
            if id(page) not in assigned:
                self.pool.release(page)

    def _addr_of(self, page: int) -> int:
        return self.addr + page * self.page_size

    def _check(self, first: int, count: int) -> None:
        if self._closed:
            raise ClosedError("virtual tensor: used after close()")
        if count < 0 or first < 0 or first + count > self.num_pages:
            raise InvalidArgument(f"pages [{first}, {first + count}) outside 0..{self.num_pages}")

    def _page_span(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0 or offset + length > self.reserved_bytes:
            raise InvalidArgument(f"bytes [{offset}, {offset + length}) outside "
                                  f"0..{self.reserved_bytes}")
        if length == 0:
            return offset // self.page_size, 0
        first = offset // self.page_size
        last = (offset + length - 1) // self.page_size
        return first, last - first + 1
