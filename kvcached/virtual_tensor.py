"""A torch tensor over a reserved virtual range whose physical pages come and go.

The range is reserved once, so the tensor's address never moves: kernels and
CUDA graphs captured over it stay valid while pages are mapped and unmapped
underneath. Every page is in one of two states:

    ZERO    no page: the shared read-only zero page, so reads see 0 and writes fault
    MAPPED  a physical page from the pool, read/write

Giving pages back synchronizes the device once per call, here and nowhere
else (one owner): unmapping a page a kernel still reads is an
illegal-address crash, and a caller that gives back many spans at once
(KVCache.trim over every slot) passes them together to `unmap_spans`, so it
costs one cuCtxSynchronize, not one a span. Mapping changes what kernels read
(the zero page is swapped out): the caller makes sure none reads those pages
meanwhile (KVCache.ensure says when that needs a synchronize).

Swapping the zero page out and back costs about as much driver time as the
raw map or give-back (benchmarks/vmm_driver_costs.py). A variant that moves
that work off the caller's path, where the caller vouches no kernel reads the
pages, is measured in benchmarks/staged_vmm.py; the daemon does not use it:
at the default GPU page size (32 MiB, kvcached/config.py) there are 16x fewer
mappings to pay for, and the yield figures hold without it.
"""
from __future__ import annotations

import ctypes
import math
import threading
from typing import Callable, Iterable, Sequence

import torch

from kvcached.errors import ClosedError, InvalidArgument
from kvcached.page_pool import Page, PagePool


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


def runs(indices: Sequence[int], key: Callable[[int], object] = lambda i: None
         ) -> list[tuple[int, int, object]]:
    """Sorted page indices -> (first, count, key) runs of adjacent pages with one key."""
    out: list[tuple[int, int, object]] = []
    for i in indices:
        k = key(i)
        if out and out[-1][0] + out[-1][1] == i and out[-1][2] == k:
            out[-1] = (out[-1][0], out[-1][1] + 1, k)
        else:
            out.append((i, 1, k))
    return out


class VirtualTensor:
    """`shape`/`dtype` tensor over `num_pages` pages of `pool.page_size` bytes. Thread-safe."""

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
        self._pages: list[Page | None] = [None] * self.num_pages   # None: the zero page
        self._num_mapped = 0
        self._lock = threading.Lock()
        self._closed = False
        self.addr = self._backend.reserve(self.reserved_bytes)
        make_bytes = _BYTE_VIEWS[self._backend.device.type]
        raw = make_bytes(self.addr, self.reserved_bytes, self._backend.device)
        self.tensor = raw[: self.nbytes].view(dtype).view(self.shape)

    # -- by pages ---------------------------------------------------------
    def map_pages(self, first: int, count: int) -> int:
        """Map every page of [first, first+count) read/write; returns bytes newly mapped.
        All or nothing: on PoolExhausted/DeviceOutOfMemory nothing changes. Kernels must
        not read these pages while this runs (the zero page is briefly swapped out);
        contents of a newly mapped page are undefined."""
        with self._lock:
            self._check(first, count)
            todo = [i for i in range(first, first + count) if self._pages[i] is None]
            if not todo:
                return 0
            pages = self.pool.acquire_many(len(todo))  # first: PoolExhausted changes nothing
            self._attach(todo, pages)
            return len(todo) * self.page_size

    def unmap_pages(self, first: int, count: int) -> int:
        """Give back the mapped pages of [first, first+count) after synchronizing the
        device; returns bytes handed back to the pool."""
        return self.unmap_spans([(first, count)])

    def unmap_spans(self, spans: Iterable[tuple[int, int]]) -> int:
        """unmap_pages() for many (first, count) spans at the cost of one synchronize."""
        with self._lock:
            todo: set[int] = set()
            for first, count in spans:
                self._check(first, count)
                todo.update(i for i in range(first, first + count) if self._pages[i] is not None)
            return self._detach(sorted(todo))

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
        return self._num_mapped * self.page_size

    # -- life cycle -------------------------------------------------------
    def close(self) -> None:
        """Give every page back and free the reservation; `.tensor` must not be used after."""
        with self._lock:
            if self._closed:
                return
            self._detach(self.mapped_pages())
            self._closed = True
            self._backend.free_reservation(self.addr, self.reserved_bytes)

    def __enter__(self) -> "VirtualTensor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VirtualTensor(shape={self.shape}, dtype={self.dtype}, pages="
                f"{self._num_mapped}/{self.num_pages} of {self.page_size} bytes)")

    # -- inside (the lock held) --------------------------------------------
    def _attach(self, todo: list[int], pages: list[Page]) -> None:
        """Map `pages` at the unmapped pages `todo`, run by run; all or nothing (a
        failed run's zero page is put back by the backend)."""
        done: list[int] = []
        for start, n, _ in runs(todo):
            chunk = pages[len(done):len(done) + n]
            try:
                self._backend.map_pages(self._addr_of(start), [p.handle for p in chunk],
                                        self.page_size)
            except BaseException:
                self.pool.release_many(pages[len(done):])
                self._detach(done)
                raise
            self._set(start, chunk)
            done.extend(range(start, start + n))

    def _detach(self, todo: list[int]) -> int:
        """Give back the pages at `todo` (sorted): one synchronize, unmap run by run
        (the zero page goes back), then the pages return to the pool."""
        if not todo:
            return 0
        # A kernel still reading a page we unmap is an illegal-address crash.
        self._backend.synchronize()
        for start, n, _ in runs(todo):
            self._backend.unmap_pages(self._addr_of(start), n, self.page_size)
        released = [self._pages[i] for i in todo]
        for i in todo:
            self._pages[i] = None
        self._num_mapped -= len(todo)
        self.pool.release_many(released)
        return len(todo) * self.page_size

    def _set(self, start: int, chunk: list[Page]) -> None:
        self._pages[start:start + len(chunk)] = chunk
        self._num_mapped += len(chunk)

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
