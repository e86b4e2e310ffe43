"""The page pool on the host backend: budget, reserve, shrink, threads, and a
hypothesis state machine over random map/unmap sequences."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvcached.config import KvcachedConfig
from kvcached.errors import ClosedError, ConfigError, PoolExhausted
from kvcached.page_pool import PagePool
from kvcached.virtual_tensor import VirtualTensor
from kvcached.vmm import open_backend

PAGE = 64 * 1024  # the smallest page the config allows: keeps hypothesis fast


def _config(**kw) -> KvcachedConfig:
    return KvcachedConfig(**{"backend": "host", "page_size": PAGE, "budget_bytes": 8 * PAGE,
                             "reserve_pages": 2, **kw})


def _committed(backend) -> int:
    """Bytes really allocated in the host backend's page memfd."""
    return os.fstat(backend._data_fd).st_blocks * 512


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    """Poll briefly for the refill thread; no fixed sleeps."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@pytest.fixture
def backend():
    with open_backend(_config()) as b:
        yield b


def test_reserve_is_filled_and_refilled_in_background(backend):
    with PagePool(backend, _config()) as pool:
        assert pool.held() == 0 == _committed(backend)        # an idle pool holds nothing
        first = pool.acquire()
        assert _wait_for(lambda: pool.reserved() == 2 * PAGE)  # filled from the first acquire
        page = pool.acquire()
        assert page.size == PAGE
        assert _wait_for(lambda: pool.reserved() == 2 * PAGE)  # the thread made a new one
        assert pool.held() == 4 * PAGE == _committed(backend)
        pool.release(page)  # reserve full: really freed
        assert pool.held() == 3 * PAGE == _committed(backend)
        pool.release(first)  # the last page in use: the reserve goes with it
        assert pool.held() == 0 == _committed(backend)


def test_budget_is_a_clear_exception(backend):
    with PagePool(backend, _config(budget_bytes=3 * PAGE)) as pool:
        pages = [pool.acquire() for _ in range(3)]
        assert pool.available() == 0
        with pytest.raises(PoolExhausted):
            pool.acquire()
        pool.release(pages.pop())
        pages.append(pool.acquire())
        assert pool.held() <= 3 * PAGE
        for p in pages:
            pool.release(p)


def test_shrink_frees_the_reserve_and_keeps_it_empty(backend):
    with PagePool(backend, _config(reserve_pages=3)) as pool:
        pool.fill_reserve()
        assert pool.reserved() == 3 * PAGE
        assert pool.shrink() == 3 * PAGE
        assert pool.reserved() == 0 and _committed(backend) == 0
        assert pool.fill_reserve() == 3  # asked for again explicitly


def test_set_budget_trims_the_reserve(backend):
    with PagePool(backend, _config(reserve_pages=4)) as pool:
        pool.fill_reserve()
        page = pool.acquire()
        pool.fill_reserve()
        pool.set_budget(3 * PAGE)
        stats = pool.stats()
        assert (stats.in_use_pages, stats.reserved_pages) == (1, 2)
        pool.release(page)
        assert pool.held() <= 3 * PAGE


def test_page_size_must_fit_the_backend():
    with open_backend(_config(page_size=2 * PAGE)) as backend:
        with pytest.raises(ConfigError):
            PagePool(backend, _config(page_size=3 * PAGE))  # not a multiple of the zero page


def test_use_after_close(backend):
    pool = PagePool(backend, _config())
    pool.close()
    pool.close()
    with pytest.raises(ClosedError):
        pool.acquire()


def test_threads_acquire_and_release_concurrently(backend):
    with PagePool(backend, _config(budget_bytes=16 * PAGE, reserve_pages=3)) as pool:
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for _ in range(200):
                    try:
                        page = pool.acquire()
                    except PoolExhausted:
                        continue
                    pool.release(page)
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        pool.fill_reserve()
        stats = pool.stats()
        assert stats.in_use_pages == 0 and stats.reserved_pages == 3
        assert _committed(backend) == 3 * PAGE


class MapUnmapMachine(RuleBasedStateMachine):
    """Random map/unmap/shrink over two tensors sharing one pool (the staged variant,
    with prepare and a deferred zero page, is tests/benchmarks/test_staged_vmm.py).
    After each step the pool is made quiescent (fill_reserve), then: pages held =
    pages mapped + pages in reserve, measured against the memory really committed in
    the backend; data written to a mapped page reads back until it is unmapped; every
    other page reads zeros."""

    NUM_PAGES = 6
    spans = st.tuples(st.integers(0, 1), st.integers(0, NUM_PAGES - 1), st.integers(0, 3))
    pool_class = PagePool
    tensor_class = VirtualTensor

    def __init__(self) -> None:
        super().__init__()
        self.config = _config(budget_bytes=9 * PAGE, reserve_pages=2)
        self.backend = open_backend(self.config)
        self.pool = self.pool_class(self.backend, self.config)
        self.tensors = [self.tensor_class(self.pool, (self.NUM_PAGES, PAGE), torch.uint8)
                        for _ in range(2)]
        self.stamps: list[dict[int, int]] = [{}, {}]  # tensor -> page -> byte written
        self.prepared: list[set[int]] = [set(), set()]
        self.counter = 0

    def _span(self, span: tuple[int, int, int]) -> tuple[VirtualTensor, int, int, int]:
        t, first, count = span
        return self.tensors[t], t, first, min(count, self.NUM_PAGES - first)

    @rule(span=spans)
    def map(self, span) -> None:
        vt, t, first, count = self._span(span)
        before = set(vt.mapped_pages())
        try:
            vt.map_pages(first, count)
        except PoolExhausted:
            assert set(vt.mapped_pages()) == before  # all or nothing
            return
        for page in range(first, first + count):
            self.prepared[t].discard(page)
            if page not in before:
                self.counter = self.counter % 250 + 1
                vt.tensor[page] = self.counter
                self.stamps[t][page] = self.counter

    def _unmap(self, span, **how) -> None:
        vt, t, first, count = self._span(span)
        expected = sum(1 for p in range(first, first + count) if p in self.stamps[t])
        assert vt.unmap_pages(first, count, **how) == expected * PAGE
        for page in range(first, first + count):
            self.stamps[t].pop(page, None)
            self.prepared[t].discard(page)

    @rule(span=spans)
    def unmap(self, span) -> None:
        self._unmap(span)

    @rule()
    def shrink(self) -> None:
        reserved = self.pool.reserved()
        assert self.pool.shrink() == reserved

    def _bare(self, vt, prepared: set[int]) -> set[int]:
        """Pages with no mapping at all (reads would fault): none in kvcached's tensor."""
        return set()

    @invariant()
    def accounting_and_data(self) -> None:
        self.pool.fill_reserve()
        stats = self.pool.stats()
        held = sum(len(vt.mapped_pages()) for vt in self.tensors)
        assert stats.in_use_pages == held
        assert _committed(self.backend) == (held + stats.reserved_pages) * PAGE
        assert stats.held_pages <= stats.budget_pages
        for vt, stamps, prepared in zip(self.tensors, self.stamps, self.prepared):
            assert sorted(stamps) == vt.mapped_pages()
            for page in set(range(self.NUM_PAGES)) - self._bare(vt, prepared):
                expected = stamps.get(page, 0)
                row = vt.tensor[page]
                assert int(row[0]) == expected and int(row[-1]) == expected

    def teardown(self) -> None:
        for vt in self.tensors:
            vt.close()
        self.pool.close()
        assert _committed(self.backend) == 0
        self.backend.close()


MACHINE_SETTINGS = settings(max_examples=50, stateful_step_count=30, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])
MapUnmapMachine.TestCase.settings = MACHINE_SETTINGS
test_map_unmap_state_machine = MapUnmapMachine.TestCase
