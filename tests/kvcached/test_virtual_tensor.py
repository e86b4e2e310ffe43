"""Virtual tensors on the host backend: a torch tensor whose pages come and go."""
from __future__ import annotations

import faulthandler
import os
import signal

import pytest
import torch

from kvcached.config import KvcachedConfig
from kvcached.errors import ClosedError, InvalidArgument, PoolExhausted
from kvcached.page_pool import PagePool
from kvcached.rss import rss_bytes
from kvcached.virtual_tensor import VirtualTensor
from kvcached.vmm import open_backend

MiB = 1 << 20
PAGE = 2 * MiB
SLACK = PAGE // 2  # under one page: torch and Python allocate a little between two reads


@pytest.fixture
def pool():
    config = KvcachedConfig(backend="host", page_size=PAGE, budget_bytes=32 * PAGE, reserve_pages=0)
    with open_backend(config) as backend, PagePool(backend, config) as p:
        yield p


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8])
def test_shape_dtype_and_zero_reads(pool, dtype):
    with VirtualTensor(pool, (3, 1000, 700), dtype) as vt:
        assert vt.tensor.shape == (3, 1000, 700) and vt.tensor.dtype == dtype
        assert vt.nbytes == 3 * 1000 * 700 * vt.tensor.element_size()
        assert vt.num_pages == -(-vt.nbytes // PAGE)
        assert vt.tensor.data_ptr() == vt.addr
        assert not vt.tensor.any()  # every page unmapped: the zero page


def test_write_read_unmap_and_address_never_moves(pool):
    with VirtualTensor(pool, (8, PAGE // 4), torch.float32) as vt:  # one row per page
        ptr = vt.tensor.data_ptr()
        assert vt.map_pages(2, 3) == 3 * PAGE
        vt.tensor[2:5] = torch.arange(3, dtype=torch.float32)[:, None] + 1
        assert vt.tensor[:, 0].tolist() == [0, 0, 1, 2, 3, 0, 0, 0]
        assert vt.mapped_pages() == [2, 3, 4] and vt.mapped_bytes == 3 * PAGE
        assert vt.unmap_pages(3, 1) == PAGE
        assert vt.tensor[:, 7].tolist() == [0, 0, 1, 0, 3, 0, 0, 0]
        assert vt.map_pages(0, 8) == 6 * PAGE  # already-mapped pages are left alone
        assert vt.tensor[2, 5].item() == 1 and vt.tensor[4, 5].item() == 3
        assert vt.tensor.data_ptr() == ptr


def test_map_and_unmap_by_bytes_cover_intersecting_pages(pool):
    with VirtualTensor(pool, (10 * PAGE,), torch.uint8) as vt:
        assert vt.map(PAGE - 1, 2) == 2 * PAGE  # straddles pages 0 and 1
        assert vt.mapped_pages() == [0, 1]
        assert vt.map(5 * PAGE, 0) == 0
        assert vt.unmap(PAGE, 1) == PAGE
        assert vt.is_mapped(0) and not vt.is_mapped(1)


def test_rss_tracks_mapped_bytes_within_one_page(pool):
    with VirtualTensor(pool, (16 * PAGE,), torch.uint8) as vt:
        base = rss_bytes()
        vt.map_pages(0, 10)
        assert abs(rss_bytes() - base - 10 * PAGE) < SLACK
        vt.tensor[: 10 * PAGE] = 7  # writing mapped pages adds nothing: they are resident
        assert abs(rss_bytes() - base - 10 * PAGE) < SLACK
        vt.unmap_pages(0, 6)
        assert abs(rss_bytes() - base - 4 * PAGE) < SLACK
        vt.unmap_pages(0, 16)
        assert abs(rss_bytes() - base) < SLACK
        assert pool.held() == 0  # reserve_pages=0: every page went back to the system


def test_write_to_unmapped_page_faults_in_child_and_never_lands(pool):
    with VirtualTensor(pool, (4, PAGE), torch.uint8) as vt:
        vt.map_pages(0, 1)
        vt.tensor[0] = 5
        pid = os.fork()
        if pid == 0:
            faulthandler.disable()
            vt.tensor[2, 100] = 1  # page 2 is the read-only zero page
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        assert not vt.tensor[1:].any()
        assert bool((vt.tensor[0] == 5).all())


def test_map_is_all_or_nothing_over_budget():
    config = KvcachedConfig(backend="host", page_size=PAGE, budget_bytes=3 * PAGE, reserve_pages=1)
    with open_backend(config) as backend, PagePool(backend, config) as pool:
        with VirtualTensor(pool, (8 * PAGE,), torch.uint8) as vt:
            vt.map_pages(0, 1)
            with pytest.raises(PoolExhausted):
                vt.map_pages(2, 5)
            assert vt.mapped_pages() == [0]
            assert pool.stats().in_use_pages == 1
            assert vt.map_pages(2, 2) == 2 * PAGE  # the budget's rest still works


def test_bad_ranges_and_use_after_close(pool):
    vt = VirtualTensor(pool, (4 * PAGE,), torch.uint8)
    for first, count in [(-1, 1), (0, 5), (4, 1), (2, -1)]:
        with pytest.raises(InvalidArgument):
            vt.map_pages(first, count)
    with pytest.raises(InvalidArgument):
        vt.unmap(4 * PAGE - 1, 2)
    vt.map_pages(0, 2)
    vt.close()
    vt.close()
    assert pool.stats().in_use_pages == 0
    with pytest.raises(ClosedError):
        vt.map_pages(0, 1)


@pytest.mark.parametrize("shape", [(0, 4), (-1, 2)])
def test_empty_or_negative_shape_is_rejected(pool, shape):
    with pytest.raises(InvalidArgument):
        VirtualTensor(pool, shape, torch.float16)


def test_pages_move_between_tensors_through_the_pool():
    config = KvcachedConfig(backend="host", page_size=PAGE, budget_bytes=2 * PAGE, reserve_pages=2)
    with open_backend(config) as backend, PagePool(backend, config) as pool:
        a = VirtualTensor(pool, (2 * PAGE,), torch.uint8)
        b = VirtualTensor(pool, (2 * PAGE,), torch.uint8)
        a.map_pages(0, 2)
        with pytest.raises(PoolExhausted):
            b.map_pages(0, 1)
        a.unmap_pages(0, 2)  # back to the reserve
        assert b.map_pages(0, 2) == 2 * PAGE
        assert not a.tensor.any()
        a.close()
        b.close()
