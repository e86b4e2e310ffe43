"""The benchmark-only staged virtual tensor (benchmarks/staged_vmm.py) on the host
backend: prepared pages (no mapping, no memory), a deferred zero page, settle, and
the core state machine with those steps added. Moved here with the code from
kvcached (issue 14): the daemon never used them."""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule

from benchmarks.staged_vmm import StagedPool, StagedVirtualTensor
from kvcached.config import KvcachedConfig
from kvcached.rss import rss_bytes
from kvcached.vmm import open_backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kvcached"))
from test_page_pool import MACHINE_SETTINGS, PAGE as MACHINE_PAGE, MapUnmapMachine  # noqa: E402

MiB = 1 << 20
PAGE = 2 * MiB
SLACK = PAGE // 2  # under one page: torch and Python allocate a little between two reads


@pytest.fixture
def pool():
    config = KvcachedConfig(backend="host", page_size=PAGE, budget_bytes=32 * PAGE, reserve_pages=0)
    with open_backend(config) as backend, StagedPool(backend, config) as p:
        yield p


def test_prepared_pages_hold_nothing_fault_on_read_and_map(pool):
    with StagedVirtualTensor(pool, (6, PAGE), torch.uint8) as vt:
        vt.map_pages(0, 1)
        vt.tensor[0] = 9
        assert vt.prepare_pages(0, 4) == 3  # the mapped page is left alone
        assert vt.prepared_pages() == [1, 2, 3] and pool.held() == PAGE
        pid = os.fork()
        if pid == 0:
            faulthandler.disable()
            int(vt.tensor[2, 5])  # no mapping at all: the caller vouched nobody reads it
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        assert vt.map_pages(1, 2) == 2 * PAGE
        vt.tensor[1:3] = 4
        assert vt.mapped_pages() == [0, 1, 2] and vt.prepared_pages() == [3]
        assert vt.unmap_pages(3, 3) == 0  # un-prepares: the zero page is back
        assert vt.prepared_pages() == [] and not vt.tensor[3:].any()
        assert int(vt.tensor.sum()) == 9 * PAGE + 4 * 2 * PAGE


def test_deferred_zero_gives_memory_back_then_settles_to_zeros(pool):
    with StagedVirtualTensor(pool, (8 * PAGE,), torch.uint8) as vt:
        vt.map_pages(0, 8)
        vt.tensor.fill_(6)
        base = rss_bytes()
        assert vt.unmap_pages(2, 4, defer_zero=True) == 4 * PAGE
        assert abs(base - rss_bytes() - 4 * PAGE) < SLACK  # memory is back at once
        assert pool.stats().in_use_pages == 4
        vt.settle()
        assert vt.pending_zero_pages() == []
        assert not vt.tensor[2 * PAGE: 6 * PAGE].any()
        assert bool((vt.tensor[: 2 * PAGE] == 6).all()) and bool((vt.tensor[6 * PAGE:] == 6).all())


def test_mapping_right_after_a_deferred_give_back(pool):
    with StagedVirtualTensor(pool, (16 * PAGE,), torch.uint8) as vt:
        for _ in range(5):  # some restores get cancelled, some have already run
            vt.map_pages(0, 16)
            vt.tensor.fill_(1)
            vt.unmap_pages(0, 16, defer_zero=True)
            vt.map_pages(4, 4)
            vt.tensor[4 * PAGE: 8 * PAGE] = 2
            assert int(vt.tensor[4 * PAGE: 8 * PAGE].sum()) == 2 * 4 * PAGE
            vt.prepare_pages(8, 2)
            vt.map_pages(8, 1)
            vt.unmap_pages(0, 16)
        vt.settle()
        assert not vt.tensor.any()
        assert pool.held() == 0


class StagedMapUnmapMachine(MapUnmapMachine):
    """The core machine plus prepare, unmap with a deferred zero page, and settle."""

    pool_class = StagedPool
    tensor_class = StagedVirtualTensor
    spans = MapUnmapMachine.spans

    @rule(span=spans)
    def prepare(self, span) -> None:
        vt, t, first, count = self._span(span)
        pending = set(vt.pending_zero_pages())
        vt.prepare_pages(first, count)
        self.prepared[t].update(p for p in range(first, first + count)
                                if p not in self.stamps[t] and p not in pending)

    @rule(span=spans, defer=st.booleans())
    def unmap_deferred(self, span, defer: bool) -> None:
        self._unmap(span, defer_zero=defer)

    @rule(t=st.integers(0, 1))
    def settle(self, t: int) -> None:
        self.tensors[t].settle()
        assert self.tensors[t].pending_zero_pages() == []

    def _bare(self, vt, prepared: set[int]) -> set[int]:
        return set(vt.pending_zero_pages()) | prepared  # no mapping: reads would fault

    @invariant()
    def prepared_as_expected(self) -> None:
        for vt, prepared in zip(self.tensors, self.prepared):
            assert sorted(prepared) == vt.prepared_pages()


assert MACHINE_PAGE == 64 * 1024
StagedMapUnmapMachine.TestCase.settings = MACHINE_SETTINGS
test_staged_map_unmap_state_machine = StagedMapUnmapMachine.TestCase
