"""A torch tensor over a reserved virtual range whose physical pages come and go.

The range is reserved once, so the tensor's address never moves: kernels and
CUDA graphs captured over it stay valid while pages are mapped and unmapped
underneath. Every page is in one of three states:

    ZERO    no page; the shared read-only zero page: reads 0, writes fault
    MAPPED  a page, read/write
    BARE    no mapping at all: reads fault. Only where the caller said no kernel
            reads it: prepared for mapping (prepare_pages), or given back with
            defer_zero while the zero worker has not yet put the zero page back

Why BARE exists (H100, benchmarks/vmm_driver_costs.py): swapping the zero page
out costs a cuMemUnmap (~19 us) and back in a cuMemMap + cuMemSetAccess
(~30 us) per page, on top of the raw map (~26 us) or give-back (~30 us).
Batching adjacent pages into one call does not help (the driver's cost
follows mappings), so that work is moved off the measured path, but only
where the caller vouches for it.
"""
from __future__ import annotations

import ctypes
import math
import threading
from typing import Callable, Sequence

import torch

from kvcached.errors import ClosedError, InvalidArgument
from kvcached.page_pool import Page, PagePool
from kvcached.zero_worker import ZeroTask

ZERO, MAPPED, BARE = range(3)


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


def _runs(indices: Sequence[int], key: Callable[[int], object] = lambda i: None
          ) -> list[tuple[int, int, object]]:
    """Sorted page indices -> (first, count, key) runs of adjacent pages with one key."""
    runs: list[tuple[int, int, object]] = []
    for i in indices:
        k = key(i)
        if runs and runs[-1][0] + runs[-1][1] == i and runs[-1][2] == k:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, k)
        else:
            runs.append((i, 1, k))
    return runs


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
        self._worker = pool.zero_worker
        self._pages: list[Page | None] = [None] * self.num_pages
        self._state = bytearray(self.num_pages)  # ZERO everywhere
        self._tasks: dict[int, ZeroTask] = {}    # BARE page -> its pending zero page
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
            state = self._state
            todo = [i for i in range(first, first + count) if state[i] != MAPPED]
            if not todo:
                return 0
            pages = self.pool.acquire_many(len(todo))  # first: PoolExhausted changes nothing
            try:
                if self._tasks:
                    self._take_back_bare(todo)
            except BaseException:  # a zero-page restore failed: a driver error, fatal
                self.pool.release_many(pages)
                raise
            self._worker.touch()
            self._attach(todo, pages)
            return len(todo) * self.page_size

    def prepare_pages(self, first: int, count: int) -> int:
        """Swap the zero page out of [first, first+count) ahead of map_pages, which then
        costs what the raw driver calls cost. The caller vouches that no kernel reads
        these pages until they are mapped (reads would fault) or unmapped (which puts
        the zero page back). Holds no memory. Returns the number of pages prepared."""
        with self._lock:
            self._check(first, count)
            todo = [i for i in range(first, first + count) if self._state[i] == ZERO]
            for start, n, _ in _runs(todo):
                self._backend.unmap_pages(self._addr_of(start), n, self.page_size,
                                          restore_zero=False)
                self._state[start:start + n] = bytes([BARE]) * n
            return len(todo)

    def unmap_pages(self, first: int, count: int, defer_zero: bool = False) -> int:
        """Give back the mapped pages of [first, first+count) after synchronizing the
        device (prepared ones get the zero page back); returns bytes handed back to the
        pool. `defer_zero`: the zero page comes back from the pool's zero worker, so the
        memory goes back at the raw driver rate; the caller vouches that no kernel
        reads these pages until settle() (reads before that may fault)."""
        with self._lock:
            self._check(first, count)
            state = self._state
            prepared = [i for i in range(first, first + count)
                        if state[i] == BARE and i not in self._tasks]
            self._restore_zero(prepared)
            mapped = [i for i in range(first, first + count) if state[i] == MAPPED]
            return self._detach(mapped, defer_zero)

    def settle(self) -> None:
        """Put the zero page back wherever a deferred give-back left none; cheap when
        nothing is pending. Prepared pages stay prepared."""
        with self._lock:
            self._finish_tasks(list(self._tasks))

    # -- by bytes ---------------------------------------------------------
    def map(self, offset: int, length: int) -> int:
        """Map every page intersecting [offset, offset+length) bytes."""
        return self.map_pages(*self._page_span(offset, length))

    def unmap(self, offset: int, length: int, defer_zero: bool = False) -> int:
        """Unmap every page intersecting [offset, offset+length) bytes."""
        return self.unmap_pages(*self._page_span(offset, length), defer_zero=defer_zero)

    # -- queries ----------------------------------------------------------
    def is_mapped(self, page: int) -> bool:
        self._check(page, 1)
        return self._state[page] == MAPPED

    def mapped_pages(self) -> list[int]:
        return [i for i, s in enumerate(self._state) if s == MAPPED]

    def prepared_pages(self) -> list[int]:
        return [i for i, s in enumerate(self._state) if s == BARE and i not in self._tasks]

    def pending_zero_pages(self) -> list[int]:
        """Pages given back with defer_zero whose zero page may not be back yet."""
        return sorted(self._tasks)

    @property
    def mapped_bytes(self) -> int:
        return self._state.count(MAPPED) * self.page_size

    # -- life cycle -------------------------------------------------------
    def close(self) -> None:
        """Give every page back and free the reservation; `.tensor` must not be used after."""
        with self._lock:
            if self._closed:
                return
            self._finish_tasks(list(self._tasks))
            self._restore_zero([i for i, s in enumerate(self._state) if s == BARE])
            self._detach([i for i, s in enumerate(self._state) if s == MAPPED], False)
            self._closed = True
            self._backend.free_reservation(self.addr, self.reserved_bytes)

    def __enter__(self) -> "VirtualTensor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"VirtualTensor(shape={self.shape}, dtype={self.dtype}, pages="
                f"{self._state.count(MAPPED)}/{self.num_pages} of {self.page_size} bytes)")

    # -- inside -----------------------------------------------------------
    def _attach(self, todo: list[int], pages: list[Page]) -> None:
        """Map `pages` at the ZERO/BARE pages `todo`, run by run; all or nothing."""
        runs = _runs(todo, key=self._state.__getitem__)
        done: list[int] = []
        for r, (start, n, was) in enumerate(runs):
            chunk = pages[len(done):len(done) + n]
            try:
                self._backend.map_pages(self._addr_of(start), [p.handle for p in chunk],
                                        self.page_size, bare=was == BARE)
            except BaseException:
                self._undo_attach(runs[r:], done, pages[len(done):])
                raise
            self._pages[start:start + n] = chunk
            self._state[start:start + n] = bytes([MAPPED]) * n
            done.extend(range(start, start + n))

    def _undo_attach(self, left: list, done: list[int], unused: list[Page]) -> None:
        """After a failed run (left[0]; the backend put its zero page back): the zero
        page over every run never tried, the pages already mapped given back."""
        start, n, _ = left[0]
        self._state[start:start + n] = bytes([ZERO]) * n
        self._restore_zero([i for start, n, was in left[1:] if was == BARE
                            for i in range(start, start + n)])
        self._detach(done, False)
        self.pool.release_many(unused)

    def _detach(self, todo: list[int], defer_zero: bool) -> int:
        """Give back the pages at `todo`: unmap, return them to the pool (the memory is
        back here), then the zero page, now or from the zero worker."""
        if not todo:
            return 0
        # A kernel still reading a page we unmap is an illegal-address crash.
        self._backend.synchronize()
        runs = _runs(todo)
        for start, n, _ in runs:
            self._backend.unmap_pages(self._addr_of(start), n, self.page_size, restore_zero=False)
            self._state[start:start + n] = bytes([BARE]) * n
        released = [self._pages[i] for i in todo]
        for i in todo:
            self._pages[i] = None
        self.pool.release_many(released)
        if defer_zero:
            for start, n, _ in runs:  # one task per run: the driver cost is per page anyway
                task = self._worker.submit(self._addr_of(start), n * self.page_size)
                self._tasks.update(dict.fromkeys(range(start, start + n), task))
        else:
            self._restore_zero(todo)
        return len(todo) * self.page_size

    def _restore_zero(self, bare: list[int]) -> None:
        for start, n, _ in _runs(bare):
            self._backend.map_zero(self._addr_of(start), n * self.page_size)
            self._state[start:start + n] = bytes([ZERO]) * n

    def _take_back_bare(self, indices: list[int]) -> None:
        """Pages about to be mapped: a zero page not yet restored is no longer wanted
        there (those pages stay BARE and are mapped as they are; the rest of the task's
        run gets a new task); one being restored is waited for."""
        wanted = set(indices)
        for task in {id(t): t for i in indices if (t := self._tasks.get(i))}.values():
            covered = self._pages_of(task)
            if self._worker.cancel(task):
                rest = [i for i in covered if i not in wanted]
                for start, n, _ in _runs(rest):
                    again = self._worker.submit(self._addr_of(start), n * self.page_size)
                    self._tasks.update(dict.fromkeys(range(start, start + n), again))
            else:
                self._worker.finish(task)
                self._state[covered[0]:covered[-1] + 1] = bytes([ZERO]) * len(covered)

    def _finish_tasks(self, indices: list[int]) -> None:
        for task in {id(t): t for i in indices if (t := self._tasks.get(i))}.values():
            covered = self._pages_of(task)
            self._worker.finish(task)
            self._state[covered[0]:covered[-1] + 1] = bytes([ZERO]) * len(covered)

    def _pages_of(self, task: ZeroTask) -> list[int]:
        """The pages a task covers (one adjacent run), taken out of the task table."""
        first = (task.addr - self.addr) // self.page_size
        covered = list(range(first, first + task.size // self.page_size))
        for i in covered:
            del self._tasks[i]
        return covered

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
