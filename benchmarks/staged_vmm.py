"""The staged variant of the virtual tensor, kept for benchmarks/vmm.py: the
zero page swapped out ahead of a map (`prepare_pages`) and put back after a
give-back by a background thread (`defer_zero`, `settle`).

Why it is here and not in kvcached: the daemon never used it. It saves the
zero-page swap (a cuMemUnmap ~19 us before a map, a cuMemMap + cuMemSetAccess
~30 us after a give-back, per mapping on the H100: benchmarks/vmm_driver_costs.py)
only where the caller vouches that no kernel reads the pages in between, a
promise the engines' batched decode (which reads every slot's tail) cannot
make; and at the default GPU page size of 32 MiB (kvcached/config.py) there
are 16x fewer mappings to pay for. kvcached's VirtualTensor has two states,
ZERO and MAPPED; this subclass adds a third:

    BARE    no mapping at all: reads fault. Prepared for mapping (prepare_pages),
            or given back with defer_zero while the zero worker has not yet put
            the zero page back
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from benchmarks.zero_worker import ZeroTask, ZeroWorker
from kvcached.config import KvcachedConfig
from kvcached.page_pool import Page, PagePool
from kvcached.virtual_tensor import VirtualTensor, runs
from kvcached.vmm.backend import VmmBackend


class StagedPool(PagePool):
    """A PagePool with a zero worker that its driver calls hold back (touch): driver
    calls from two threads serialize inside the driver."""

    def __init__(self, backend: VmmBackend, config: KvcachedConfig) -> None:
        super().__init__(backend, config)
        self.zero_worker = ZeroWorker(backend.map_zero)

    def release_many(self, pages: list[Page]) -> None:
        self.zero_worker.touch()
        super().release_many(pages)

    def shrink(self) -> int:
        self.zero_worker.touch()
        return super().shrink()

    def close(self) -> None:
        self.zero_worker.close()   # runs what is queued first
        super().close()


class StagedVirtualTensor(VirtualTensor):
    """VirtualTensor + BARE pages (prepare_pages, unmap with defer_zero, settle)."""

    def __init__(self, pool: StagedPool, shape: Sequence[int], dtype: torch.dtype) -> None:
        super().__init__(pool, shape, dtype)
        self._worker = pool.zero_worker
        self._bare = bytearray(self.num_pages)   # 1: no mapping at all
        self._tasks: dict[int, ZeroTask] = {}    # BARE page -> its pending zero page

    def prepare_pages(self, first: int, count: int) -> int:
        """Swap the zero page out of [first, first+count) ahead of map_pages, which then
        costs what the raw driver calls cost. The caller vouches that no kernel reads
        these pages until they are mapped (reads would fault) or unmapped (which puts
        the zero page back). Holds no memory. Returns the number of pages prepared."""
        with self._lock:
            self._check(first, count)
            todo = [i for i in range(first, first + count)
                    if self._pages[i] is None and not self._bare[i]]
            for start, n, _ in runs(todo):
                self._backend.unmap_pages(self._addr_of(start), n, self.page_size,
                                          restore_zero=False)
                self._bare[start:start + n] = b"\x01" * n
            return len(todo)

    def unmap_pages(self, first: int, count: int, defer_zero: bool = False) -> int:
        """Give back the mapped pages of [first, first+count) (prepared ones get the zero
        page back). `defer_zero`: the zero page comes back from the pool's zero worker,
        so the memory goes back at the raw driver rate; the caller vouches that no kernel
        reads these pages until settle() (reads before that may fault)."""
        return self.unmap_spans([(first, count)], defer_zero)

    def unmap_spans(self, spans: Iterable[tuple[int, int]], defer_zero: bool = False) -> int:
        with self._lock:
            todo: set[int] = set()
            prepared: set[int] = set()
            for first, count in spans:
                self._check(first, count)
                for i in range(first, first + count):
                    if self._pages[i] is not None:
                        todo.add(i)
                    elif self._bare[i] and i not in self._tasks:
                        prepared.add(i)
            self._restore_zero(sorted(prepared))
            return self._detach(sorted(todo), defer_zero)

    def unmap(self, offset: int, length: int, defer_zero: bool = False) -> int:
        return self.unmap_pages(*self._page_span(offset, length), defer_zero=defer_zero)

    def settle(self) -> None:
        """Put the zero page back wherever a deferred give-back left none; cheap when
        nothing is pending. Prepared pages stay prepared."""
        with self._lock:
            self._finish_tasks(list(self._tasks))

    def prepared_pages(self) -> list[int]:
        return [i for i, b in enumerate(self._bare) if b and i not in self._tasks]

    def pending_zero_pages(self) -> list[int]:
        """Pages given back with defer_zero whose zero page may not be back yet."""
        return sorted(self._tasks)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._finish_tasks(list(self._tasks))
                self._restore_zero([i for i, b in enumerate(self._bare) if b])
        super().close()

    # -- inside (the lock held) --------------------------------------------
    def _attach(self, todo: list[int], pages: list[Page]) -> None:
        try:
            if self._tasks:
                self._take_back_bare(todo)
        except BaseException:  # a zero-page restore failed: a driver error, fatal
            self.pool.release_many(pages)
            raise
        self._worker.touch()
        spans = runs(todo, key=self._bare.__getitem__)
        done: list[int] = []
        for r, (start, n, was_bare) in enumerate(spans):
            chunk = pages[len(done):len(done) + n]
            try:
                self._backend.map_pages(self._addr_of(start), [p.handle for p in chunk],
                                        self.page_size, bare=bool(was_bare))
            except BaseException:
                self._undo_attach(spans[r:], done, pages[len(done):])
                raise
            self._set(start, chunk)
            self._bare[start:start + n] = bytes(n)
            done.extend(range(start, start + n))

    def _undo_attach(self, left: list, done: list[int], unused: list[Page]) -> None:
        """After a failed run (left[0]; the backend put its zero page back): the zero
        page over every run never tried, the pages already mapped given back."""
        start, n, _ = left[0]
        self._bare[start:start + n] = bytes(n)
        self._restore_zero([i for start, n, was in left[1:] if was
                            for i in range(start, start + n)])
        self._detach(done, False)
        self.pool.release_many(unused)

    def _detach(self, todo: list[int], defer_zero: bool = False) -> int:
        """Give back the pages at `todo`: unmap, return them to the pool (the memory is
        back here), then the zero page, now or from the zero worker."""
        if not todo:
            return 0
        self._backend.synchronize()
        spans = runs(todo)
        for start, n, _ in spans:
            self._backend.unmap_pages(self._addr_of(start), n, self.page_size, restore_zero=False)
            self._bare[start:start + n] = b"\x01" * n
        released = [self._pages[i] for i in todo]
        for i in todo:
            self._pages[i] = None
        self._num_mapped -= len(todo)
        self.pool.release_many(released)
        if defer_zero:
            for start, n, _ in spans:  # one task per run: the driver cost is per page anyway
                task = self._worker.submit(self._addr_of(start), n * self.page_size)
                self._tasks.update(dict.fromkeys(range(start, start + n), task))
        else:
            self._restore_zero(todo)
        return len(todo) * self.page_size

    def _restore_zero(self, bare: list[int]) -> None:
        for start, n, _ in runs(bare):
            self._backend.map_zero(self._addr_of(start), n * self.page_size)
            self._bare[start:start + n] = bytes(n)

    def _take_back_bare(self, indices: list[int]) -> None:
        """Pages about to be mapped: a zero page not yet restored is no longer wanted
        there (those pages stay BARE and are mapped as they are; the rest of the task's
        run gets a new task); one being restored is waited for."""
        wanted = set(indices)
        for task in {id(t): t for i in indices if (t := self._tasks.get(i))}.values():
            covered = self._pages_of(task)
            if self._worker.cancel(task):
                rest = [i for i in covered if i not in wanted]
                for start, n, _ in runs(rest):
                    again = self._worker.submit(self._addr_of(start), n * self.page_size)
                    self._tasks.update(dict.fromkeys(range(start, start + n), again))
            else:
                self._worker.finish(task)
                self._bare[covered[0]:covered[-1] + 1] = bytes(len(covered))

    def _finish_tasks(self, indices: list[int]) -> None:
        for task in {id(t): t for i in indices if (t := self._tasks.get(i))}.values():
            covered = self._pages_of(task)
            self._worker.finish(task)
            self._bare[covered[0]:covered[-1] + 1] = bytes(len(covered))

    def _pages_of(self, task: ZeroTask) -> list[int]:
        """The pages a task covers (one adjacent run), taken out of the task table."""
        first = (task.addr - self.addr) // self.page_size
        covered = list(range(first, first + task.size // self.page_size))
        for i in covered:
            del self._tasks[i]
        return covered
