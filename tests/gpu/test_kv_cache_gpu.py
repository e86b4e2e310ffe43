"""KVCache on a real CUDA device: attention over the per-slot views, zeros past
the mapped pages, a CUDA graph over the batched view surviving trim and
re-mapping, and pause/resume bit-exact through a pinned staging buffer that is
kept between cycles, with the device memory really given back."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvcached.config import KvcachedConfig
from kvcached.kv_cache.layout import KVShape
from kvcached.kv_cache.manager import KVCache
from kvcached.vmm import open_backend

MiB = 1 << 20
SHAPE = KVShape(30, 3, 64, torch.float16)        # SmolLM2-135M: 91 tokens a 2 MiB page
CONFIG = KvcachedConfig(backend="cuda", page_size=2 * MiB, reserve_pages=0)


@pytest.fixture(scope="module")
def backend():
    with open_backend(CONFIG) as b:
        yield b


@pytest.fixture
def kv(backend):
    with KVCache(backend, SHAPE, max_slots=4, max_context=2048, config=CONFIG) as cache:
        yield cache


def fill(kv: KVCache, slot: int, n: int, seed: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    block = kv.slot_tokens(slot, n)               # [T, L, 2, H, D], contiguous
    block.copy_(torch.randn(block.shape, generator=gen, device="cuda", dtype=torch.float16))


def checksum(kv: KVCache, slot: int, n: int) -> int:
    raw = kv.slot_tokens(slot, n).view(torch.int16).to(torch.int64)
    weights = torch.arange(1, raw.numel() + 1, device="cuda", dtype=torch.int64) % 65521
    return int((raw.flatten() * weights).sum().item())


def test_sdpa_reads_the_slot_views_in_place(kv):
    slot = kv.acquire_slot()
    kv.ensure(slot, 300)
    fill(kv, slot, 300, seed=1)
    k, v = kv.layer_kv(slot, 7, 300)                       # [H, T, D] views
    assert k.is_cuda and k.stride(-1) == 1 and k.shape == (3, 300, 64)
    q = torch.randn(1, 3, 4, 64, device="cuda", dtype=torch.float16)
    out = F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0))
    ref = F.scaled_dot_product_attention(q, k.contiguous().unsqueeze(0), v.contiguous().unsqueeze(0))
    torch.testing.assert_close(out, ref)
    kb, _ = kv.batched_kv(7)                               # [S, H, max_context, D]
    assert torch.equal(kb[slot, :, :300], k)
    assert not kb[slot, :, 400:].any().item()              # past the 4 mapped pages: zeros


def test_cuda_graph_over_batched_view_survives_trim_and_remap(kv):
    slot = kv.acquire_slot()
    kv.ensure(slot, 100)
    fill(kv, slot, 100, seed=2)
    kb, _ = kv.batched_kv(0)
    out = torch.zeros((), device="cuda", dtype=torch.float32)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):                        # warm up off the default stream
        out.copy_(kb[slot, :, :100].float().abs().sum())
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(kb[slot, :, :100].float().abs().sum())
    graph.replay()
    torch.cuda.synchronize()
    first = out.item()
    assert first > 0
    kv.free(slot)
    assert kv.trim() > 0
    graph.replay()                                         # unmapped: reads the zero page
    torch.cuda.synchronize()
    assert out.item() == 0
    again = kv.acquire_slot()
    assert again == slot
    kv.ensure(again, 100)
    fill(kv, again, 100, seed=2)
    graph.replay()
    torch.cuda.synchronize()
    assert out.item() == first


def test_pause_resume_bit_exact_pinned_staging_kept(kv):
    sizes = [2048, 1, 700]
    slots = [kv.acquire_slot() for _ in sizes]
    for s, n in zip(slots, sizes):
        kv.ensure(s, n)
        fill(kv, s, n, seed=s + 10)
    sums = [checksum(kv, s, n) for s, n in zip(slots, sizes)]
    held = kv.held_bytes()
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    assert kv.pause() == held and kv.held_bytes() == 0
    assert torch.cuda.mem_get_info()[0] - free_before >= held // 2   # really given back
    assert kv._staging.is_pinned
    staging = kv._staging.get(1).data_ptr()
    for _ in range(3):
        kv.resume()
        assert [checksum(kv, s, n) for s, n in zip(slots, sizes)] == sums
        kv.pause()
        assert kv._staging.get(1).data_ptr() == staging    # kept between cycles
    with kv.step_guard():
        assert [checksum(kv, s, n) for s, n in zip(slots, sizes)] == sums
