"""KVCache on the real host backend: pages really mapped (RSS), views really shared."""
from __future__ import annotations

import threading
import zlib

import pytest
import torch
import torch.nn.functional as F

from kvcached.config import KvcachedConfig
from kvcached.errors import InvalidArgument, PoolExhausted
from kvcached.kv_cache.layout import KVShape
from kvcached.kv_cache.manager import KVCache
from kvcached.page_pool import PagePool
from kvcached.rss import rss_shmem_bytes
from kvcached.vmm import open_backend

PAGE = 64 * 1024
SHAPE = KVShape(4, 2, 64, "float16")        # 2048 bytes a token: 32 tokens a page
CONFIG = KvcachedConfig(backend="host", page_size=PAGE, reserve_pages=0)


@pytest.fixture
def backend():
    with open_backend(CONFIG) as b:
        yield b


@pytest.fixture
def kv(backend):
    with KVCache(backend, SHAPE, max_slots=3, max_context=200, config=CONFIG) as cache:
        yield cache


def fill(kv: KVCache, slot: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for layer in range(SHAPE.num_layers):
        k, v = kv.layer_kv(slot, layer, n)
        k.copy_(torch.randn(k.shape, generator=gen, dtype=torch.float32).to(k.dtype))
        v.copy_(torch.randn(v.shape, generator=gen, dtype=torch.float32).to(v.dtype))


def checksum(kv: KVCache, slot: int, n: int) -> int:
    crc = 0
    for layer in range(SHAPE.num_layers):
        for t in kv.layer_kv(slot, layer, n):
            crc = zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc


def test_ensure_maps_page_by_page(kv):
    slot = kv.acquire_slot()
    assert kv.held_bytes() == 0
    assert kv.ensure(slot, 1) == PAGE
    assert kv.ensure(slot, 32) == 0            # still the first page
    assert kv.ensure(slot, 33) == PAGE
    assert kv.held_bytes() == 2 * PAGE
    assert kv.live_bytes() == 33 * SHAPE.token_bytes


def test_views_are_strided_windows_sdpa_reads_without_copy(kv):
    slot = kv.acquire_slot()
    kv.ensure(slot, 50)
    fill(kv, slot, 50, seed=1)
    k, v = kv.layer_kv(slot, 2, 50)
    assert k.shape == (2, 50, 64) and k.stride(-1) == 1
    base = kv._flat.data_ptr()
    assert k.data_ptr() == base + kv.layout.element_offset(slot, 0, 2, False, 0, 0) * 2
    q = torch.randn(2, 5, 64, dtype=torch.float16)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    ref = F.scaled_dot_product_attention(q.float(), k.contiguous().float(), v.contiguous().float())
    torch.testing.assert_close(out, ref)
    # The batched view sees the same bytes at the slot's row, zeros past the mapped pages.
    kb, vb = kv.batched_kv(2)
    assert kb.shape == (3, 2, 200, 64)
    assert torch.equal(kb[slot, :, :50], k) and torch.equal(vb[slot, :, :50], v)
    assert not kb[slot, :, 64:].any()
    assert not kb[(slot + 1) % 3].any()                # a slot never mapped: all zeros


def test_free_keeps_pages_and_placement_reuses_them(kv):
    a = kv.acquire_slot()
    kv.ensure(a, 100)
    kv.free(a)
    assert kv.held_bytes() == 4 * PAGE and kv.live_bytes() == 0
    b = kv.acquire_slot()
    assert b == a                               # mapped pages first
    assert kv.ensure(b, 100) == 0               # nothing new mapped
    c = kv.acquire_slot(prefer_mapped=False)
    assert c != a


def test_trim_gives_back_only_pages_without_live_tokens(kv):
    a, b = kv.acquire_slot(), kv.acquire_slot()
    kv.ensure(a, 150)
    kv.ensure(b, 100)
    fill(kv, a, 40, seed=2)
    crc = checksum(kv, a, 40)
    kv.ensure(a, 40)                            # a shrank to 40 live tokens: 2 pages
    kv.free(b)
    rss_before = rss_shmem_bytes()
    freed = kv.trim()
    assert freed == (5 - 2) * PAGE + 4 * PAGE
    assert kv.held_bytes() == 2 * PAGE
    assert rss_before - rss_shmem_bytes() >= freed // 2   # memory really returned
    assert checksum(kv, a, 40) == crc
    assert kv.trim() == 0


def test_pool_exhausted_leaves_the_cache_as_it_was(backend):
    config = KvcachedConfig(backend="host", page_size=PAGE, reserve_pages=0, budget_bytes=3 * PAGE)
    with KVCache(backend, SHAPE, 2, 200, config) as kv:
        slot = kv.acquire_slot()
        kv.ensure(slot, 64)
        fill(kv, slot, 64, seed=3)
        crc = checksum(kv, slot, 64)
        with pytest.raises(PoolExhausted):
            kv.ensure(slot, 150)
        assert kv.held_bytes() == 2 * PAGE and kv.num_tokens(slot) == 64
        assert checksum(kv, slot, 64) == crc
        assert kv.ensure(slot, 96) == PAGE      # the budget's last page still maps


def test_pause_resume_is_bit_exact_and_keeps_staging(kv):
    slots = [kv.acquire_slot() for _ in range(3)]
    sizes = [200, 1, 77]
    for s, n, seed in zip(slots, sizes, range(3)):
        kv.ensure(s, n)
        fill(kv, s, n, seed)
    # Odd bit patterns too: NaN payloads and signalling bits must survive.
    kv.layer_kv(slots[0], 0, 1)[0].view(torch.int16).fill_(0x7E01)
    crcs = [checksum(kv, s, n) for s, n in zip(slots, sizes)]
    rss_before = rss_shmem_bytes()
    freed = kv.pause()
    assert freed == (7 + 1 + 3) * PAGE and kv.held_bytes() == 0 and kv.is_paused
    assert kv.paused_host_bytes() == sum(sizes) * SHAPE.token_bytes
    assert rss_before - rss_shmem_bytes() >= freed // 2
    assert kv.pause() == 0
    staging = kv._staging.get(1).data_ptr()
    for _ in range(2):
        kv.resume()
        assert not kv.is_paused and kv.held_bytes() == (7 + 1 + 3) * PAGE
        assert [checksum(kv, s, n) for s, n in zip(slots, sizes)] == crcs
        kv.pause()
        assert kv._staging.get(1).data_ptr() == staging    # kept between cycles
    with kv.step_guard():                                  # a step resumes it
        assert not kv.is_paused
    assert [checksum(kv, s, n) for s, n in zip(slots, sizes)] == crcs


def test_free_while_paused_drops_that_slot(kv):
    a, b = kv.acquire_slot(), kv.acquire_slot()
    kv.ensure(a, 40)
    kv.ensure(b, 40)
    fill(kv, b, 40, seed=5)
    crc = checksum(kv, b, 40)
    kv.pause()
    kv.free(a)
    kv.resume()
    assert kv.held_bytes() == 2 * PAGE
    assert checksum(kv, b, 40) == crc


def test_resume_without_room_stays_paused(backend):
    with PagePool(backend, KvcachedConfig(backend="host", page_size=PAGE, reserve_pages=0,
                                          budget_bytes=4 * PAGE)) as pool:
        kv = KVCache(pool, SHAPE, 2, 200, CONFIG)
        slot = kv.acquire_slot()
        kv.ensure(slot, 128)
        fill(kv, slot, 128, seed=6)
        crc = checksum(kv, slot, 128)
        kv.pause()
        other = KVCache(pool, SHAPE, 1, 200, CONFIG)
        other.ensure(other.acquire_slot(), 1)   # takes one of the 4 pages
        with pytest.raises(PoolExhausted):
            kv.resume()
        assert kv.is_paused and kv.held_bytes() == 0
        other.close()
        kv.resume()
        assert checksum(kv, slot, 128) == crc
        kv.close()


def test_reclaim_waits_for_running_steps(kv):
    slot = kv.acquire_slot()
    kv.ensure(slot, 100)
    kv.free(slot)
    result = {}
    with kv.step_guard():
        assert kv.is_busy()
        trimmer = threading.Thread(target=lambda: result.setdefault("freed", kv.trim()))
        trimmer.start()
        trimmer.join(0.2)
        assert trimmer.is_alive() and kv.held_bytes() == 4 * PAGE   # not while the step runs
    trimmer.join(5)
    assert result["freed"] == 4 * PAGE


def test_bad_arguments_are_typed(kv):
    with pytest.raises(InvalidArgument):
        kv.ensure(0, 5)                         # not acquired
    slot = kv.acquire_slot()
    for call in (lambda: kv.ensure(slot, 201), lambda: kv.layer_kv(slot, 4, 1),
                 lambda: kv.batched_kv(-1), lambda: kv.free(7)):
        with pytest.raises(InvalidArgument):
            call()
    for _ in range(2):
        kv.acquire_slot()
    with pytest.raises(PoolExhausted):
        kv.acquire_slot()


def test_pause_in_many_chunks_unmaps_each_only_after_its_copy(kv, monkeypatch):
    from kvcached.kv_cache import manager, offload

    monkeypatch.setattr(manager, "PAUSE_CHUNK", 2 * PAGE + 1)   # rounds down to 2 pages
    monkeypatch.setattr(manager, "RESUME_CHUNK", PAGE)
    seen = []
    real = offload.save_unmapping

    def spy(device_bytes, ranges, staging, unmap, chunk):
        assert chunk == 2 * PAGE
        starts, at = [], 0
        for offset, nbytes in ranges:
            starts.append((offset, nbytes, at))
            at += nbytes

        def checked(offset, nbytes):
            # The chunk's bytes are already on the host when its pages go.
            ro, _, rat = next(r for r in starts if r[0] <= offset < r[0] + r[1])
            host = staging.get(1)[rat + offset - ro:rat + offset - ro + nbytes]
            assert torch.equal(host, device_bytes[offset:offset + nbytes])
            seen.append((offset, nbytes))
            return unmap(offset, nbytes)
        return real(device_bytes, ranges, staging, checked, chunk)

    monkeypatch.setattr(offload, "save_unmapping", spy)
    slots = [kv.acquire_slot(), kv.acquire_slot()]
    for s, n in zip(slots, (200, 150)):
        kv.ensure(s, n)
        fill(kv, s, n, seed=s + 7)
    crcs = [checksum(kv, s, n) for s, n in zip(slots, (200, 150))]
    assert kv.pause() == (7 + 5) * PAGE
    assert len(seen) == 4 + 3                   # 7 pages -> 4 chunks, 5 pages -> 3
    kv.resume()
    assert [checksum(kv, s, n) for s, n in zip(slots, (200, 150))] == crcs


def test_shrinking_a_slot_while_paused_stays_paused(kv):
    a, b = kv.acquire_slot(), kv.acquire_slot()
    kv.ensure(a, 150)
    kv.ensure(b, 100)
    fill(kv, a, 150, seed=8)
    crc = checksum(kv, a, 40)
    kv.pause()
    assert kv.ensure(b, 0) == 0 and kv.ensure(a, 40) == 0    # a finished sequence, a truncation
    assert kv.is_paused and kv.paused_host_bytes() == 40 * SHAPE.token_bytes
    kv.resume()
    assert kv.held_bytes() == 2 * PAGE and checksum(kv, a, 40) == crc
    assert kv.ensure(a, 41) == 0 and kv.ensure(b, 1) == PAGE


class CountingSyncs:
    """The real host backend, counting synchronize() calls (the one owner of
    "synchronize before unmap" is the virtual tensor, once per give-back)."""

    def __init__(self, backend) -> None:
        self._backend = backend
        self.syncs = 0

    def synchronize(self) -> None:
        self.syncs += 1
        self._backend.synchronize()

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


def test_a_trim_over_many_slots_synchronizes_once(backend):
    counting = CountingSyncs(backend)
    with KVCache(counting, SHAPE, max_slots=3, max_context=200, config=CONFIG) as kv:
        slots = [kv.acquire_slot() for _ in range(3)]
        for slot in slots:
            kv.ensure(slot, 100)                      # 4 pages each
        kv.tail_readers = False
        for slot in slots:
            kv.ensure(slot, 10)                       # 3 pages each to trim
        before = counting.syncs
        assert kv.trim() == 3 * 3 * PAGE
        assert counting.syncs - before == 1           # was 1 + one per slot
        before = counting.syncs
        assert kv.trim() == 0
        assert counting.syncs == before               # nothing to give back: no sync
        assert [kv.num_tokens(s) for s in slots] == [10] * 3
