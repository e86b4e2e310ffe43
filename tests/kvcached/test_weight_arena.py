"""WeightArena on the host backend: tensors adopted into pool pages, moved to host and back.

Real parts: the host backend's shared-memory pages (RssShmem counts them exactly)
and a real PagePool with a budget. What is checked: values and views survive the
adoption, addresses never move, the pages really go back to the pool and come
back bit-exact (every bit pattern, NaNs included), and a restore that finds no
room stays on the host with nothing lost.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kvcached.config import KvcachedConfig
from kvcached.errors import ClosedError, PoolExhausted
from kvcached.page_pool import PagePool
from kvcached.rss import rss_shmem_bytes
from kvcached.weight_arena import ALIGN, WeightArena
from kvcached.vmm import open_backend

MiB = 1 << 20
PAGE = 2 * MiB


@pytest.fixture
def pool():
    config = KvcachedConfig(backend="host", page_size=PAGE, budget_bytes=16 * PAGE, reserve_pages=0)
    with open_backend(config) as backend, PagePool(backend, config) as p:
        yield p


def model_like() -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Linear (parameters), a row-slice view of a bigger tensor and that tensor, and raw bits
    (every pattern of 16 bits, NaNs and infinities among them, as bf16)."""
    torch.manual_seed(0)
    linear = nn.Linear(512, 1024).requires_grad_(False)
    stacked = torch.randn(3000, 256, dtype=torch.float16)
    view = stacked[1000:2000]
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return linear, stacked, view, bits


def snapshot(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_adopt_keeps_values_views_and_moves_everything_into_pages(pool):
    linear, stacked, view, bits = model_like()
    tensors = [linear.weight, linear.bias, stacked, view, bits]
    before = snapshot(tensors)
    with WeightArena(pool, tensors) as arena:
        base = arena._vt.addr
        for t, old in zip(tensors, before):
            assert same_bits(t, old)
            assert base <= t.data_ptr() < base + arena.nbytes
        assert isinstance(linear.weight, nn.Parameter)
        # One storage, one slice: the view still is a view of the stacked tensor.
        assert view.data_ptr() == stacked.data_ptr() + 1000 * 256 * 2
        stacked[1000, 0] = 7.0
        assert view[0, 0].item() == 7.0
        assert arena.num_tensors == 5 and arena.nbytes % ALIGN == 0
        assert arena.device_bytes == -(-arena.nbytes // PAGE) * PAGE == pool.stats().in_use_pages * PAGE
        y = linear(torch.ones(2, 512))
        assert torch.equal(y, nn.functional.linear(torch.ones(2, 512), before[0], before[1]))


def test_to_host_gives_pages_back_and_restore_is_bit_exact_at_the_same_addresses(pool):
    linear, stacked, view, bits = model_like()
    tensors = [linear.weight, linear.bias, stacked, view, bits]
    before = snapshot(tensors)
    arena = WeightArena(pool, tensors)
    addresses = [t.data_ptr() for t in tensors]
    mapped, shmem = arena.device_bytes, rss_shmem_bytes()
    freed = arena.to_host()
    assert freed == mapped and arena.device_bytes == 0 and arena.on_host
    assert arena.host_bytes == arena.nbytes
    assert pool.stats().in_use_pages == 0
    assert rss_shmem_bytes() <= shmem - mapped + PAGE      # the pages left this process
    assert not stacked.any()                                # the zero page reads as zeros
    assert arena.to_host() == 0                             # idempotent
    assert arena.restore() == mapped and not arena.on_host
    assert [t.data_ptr() for t in tensors] == addresses
    assert all(same_bits(t, old) for t, old in zip(tensors, before))
    assert arena.restore() == 0
    assert arena.staging_bytes >= arena.nbytes              # kept for the next step aside
    assert arena.release_staging() > 0 and arena.staging_bytes == 0
    arena.close()
    assert pool.stats().in_use_pages == 0
    with pytest.raises(ClosedError):
        arena.to_host()


def test_restore_without_room_stays_on_host_and_loses_nothing(pool):
    linear, stacked, view, bits = model_like()
    tensors = [linear.weight, stacked, bits]
    before = snapshot(tensors)
    arena = WeightArena(pool, tensors)
    pages = arena.device_bytes // PAGE
    arena.to_host()
    hogged = pool.acquire_many(pool.stats().available_pages - pages + 1)   # one page short
    with pytest.raises(PoolExhausted):
        arena.restore()
    assert arena.on_host and arena.device_bytes == 0 and pool.stats().in_use_pages == len(hogged)
    pool.release_many(hogged)
    arena.restore()
    assert all(same_bits(t, old) for t, old in zip(tensors, before))
    arena.close()


def test_an_arena_that_does_not_fit_the_budget_leaves_the_tensors_as_they_were(pool):
    big = torch.ones(20 * PAGE // 4)        # 20 pages, the budget holds 16
    with pytest.raises(PoolExhausted):
        WeightArena(pool, [big])
    assert pool.stats().in_use_pages == 0
