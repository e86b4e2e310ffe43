"""Sliding-window giveback on the real host backend: pages behind a window go back
to the pool (RSS falls), and what the slot keeps survives pause/resume, trim,
export/import bit-exact; a slot whose window moved refuses to continue early."""
from __future__ import annotations

import zlib

import pytest
import torch

from kvcached.config import KvcachedConfig
from kvcached.errors import WindowMoved
from kvcached.kv_cache.layout import KVShape
from kvcached.kv_cache.manager import KVCache
from kvcached.rss import rss_shmem_bytes
from kvcached.vmm import open_backend

PAGE = 64 * 1024
WINDOW = 64
# Gemma-3-like: 5 of 6 layers slide. 2 heads x 64 dims fp16 = 512 bytes a layer a token:
# the sliding part is 2560 bytes a token (25.6 tokens a page), the global part 512 (128).
SHAPE = KVShape(6, 2, 64, "float16", (WINDOW,) * 5 + (0,))
CONFIG = KvcachedConfig(backend="host", page_size=PAGE, reserve_pages=0)
MAX_CTX = 4096


@pytest.fixture
def kv():
    with open_backend(CONFIG) as backend, KVCache(backend, SHAPE, 2, MAX_CTX, config=CONFIG) as cache:
        yield cache


def grow(kv: KVCache, slot: int, n: int, step: int = 1) -> None:
    """Decode-like growth: each step writes its tokens' K and V (a value per token)."""
    start = kv.num_tokens(slot)
    for end in range(start + step, n + 1, step):
        kv.ensure(slot, end)
        for layer in range(SHAPE.num_layers):
            for t in kv.layer_kv(slot, layer, end):
                t[:, end - step:end] = torch.arange(end - step, end, dtype=torch.float16).view(1, -1, 1) + layer


def kept_checksum(kv: KVCache, slot: int) -> int:
    """The bytes of every token the slot still holds: all of the global layer, the
    sliding layers' from the window floor."""
    n, floor, crc = kv.num_tokens(slot), kv.window_floor(slot), 0
    for layer in range(SHAPE.num_layers):
        first = floor if SHAPE.window(layer) else 0
        for t in kv.layer_kv(slot, layer, n):
            crc = zlib.crc32(t[:, first:].contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc


def test_growing_gives_back_the_sliding_pages_behind_the_window(kv):
    slot = kv.acquire_slot()
    grow(kv, slot, 2048, step=16)
    held = kv.held_bytes()
    full = kv.layout.mapped_bytes_for(2048)
    global_bytes = kv.layout.part_pages(2048)[0] * PAGE
    # The global layer keeps all 2048 tokens; the sliding ones about their window (+ a chunk, + pages' slack).
    assert global_bytes < held <= global_bytes + -(-(WINDOW + 16) * 2560 // PAGE) * PAGE + 2 * PAGE
    assert held < full / 3
    assert kv.window_floor(slot) > 2048 - WINDOW - 16 - 2 * 26
    # The kept keys read back as written.
    for layer in range(5):
        k, _ = kv.layer_kv(slot, layer, 2048)
        assert torch.equal(k[0, 2048 - WINDOW:, 0], torch.arange(2048 - WINDOW, 2048, dtype=torch.float16) + layer)
    assert kv.live_bytes() < 2048 * SHAPE.token_bytes / 3


def test_the_host_really_gets_the_pages_back(kv):
    slot = kv.acquire_slot()
    before = rss_shmem_bytes()
    grow(kv, slot, 4096, step=64)
    held = kv.held_bytes()
    assert held < kv.layout.mapped_bytes_for(4096) / 3
    assert rss_shmem_bytes() - before <= held + 4 * PAGE


def test_gemma3_like_holds_a_sixth_plus_five_sixths_of_the_window(kv):
    slot = kv.acquire_slot()
    grow(kv, slot, MAX_CTX, step=32)
    fraction = kv.held_bytes() / kv.layout.mapped_bytes_for(MAX_CTX)
    expected = 1 / 6 + 5 / 6 * WINDOW / MAX_CTX
    assert expected <= fraction <= expected + 5 / 6 * (32 + 2 * 26) / MAX_CTX


def test_a_slot_refuses_to_continue_where_its_window_moved(kv):
    slot = kv.acquire_slot()
    grow(kv, slot, 1000, step=8)
    floor = kv.window_floor(slot)
    assert kv.can_resume_at(slot, 1000) and kv.can_resume_at(slot, floor + WINDOW)
    assert not kv.can_resume_at(slot, floor + WINDOW - 1)
    with pytest.raises(WindowMoved):
        kv.ensure(slot, floor + WINDOW - 1)            # a shorter sequence reusing the slot
    assert kv.num_tokens(slot) == 1000                 # refused: nothing changed
    kv.ensure(slot, floor + WINDOW)                    # still holds what that needs
    held = kv.held_bytes()
    kv.ensure(slot, 10, start=0)                       # a new sequence from token 0
    assert kv.window_floor(slot) == 0 and kv.held_bytes() < held


def test_pause_resume_is_bit_exact_and_never_maps_given_back_pages(kv):
    slot, other = kv.acquire_slot(), kv.acquire_slot()
    grow(kv, slot, 1500, step=16)
    grow(kv, other, 40)
    sums, held, floor = (kept_checksum(kv, slot), kept_checksum(kv, other)), kv.held_bytes(), kv.window_floor(slot)
    assert kv.pause() == held and kv.held_bytes() == 0
    assert kv.paused_host_bytes() == kv.live_bytes()
    kv.resume()
    assert kv.held_bytes() == held and kv.window_floor(slot) == floor
    assert (kept_checksum(kv, slot), kept_checksum(kv, other)) == sums
    grow(kv, slot, 1600, step=16)                      # and it goes on growing from there


def test_a_paused_slot_shrinks_within_its_window_and_exports(kv):
    slot = kv.acquire_slot()
    grow(kv, slot, 1500, step=16)
    shorter = kv.window_floor(slot) + WINDOW
    live = kv.export_slot(slot, shorter)
    kv.pause()
    with pytest.raises(WindowMoved):
        kv.ensure(slot, shorter - 1)
    kv.ensure(slot, shorter)                           # a shrink: stays paused
    assert kv.is_paused
    assert torch.equal(kv.export_slot(slot, shorter), live)
    kv.free(slot)
    kv.resume()
    assert kv.held_bytes() == 0 and kv.trim() == 0


def test_trim_keeps_the_window_and_a_freed_slot_starts_afresh(kv):
    slot = kv.acquire_slot()
    grow(kv, slot, 1000, step=8)
    kv.ensure(slot, 990)
    before, kept = kv.held_bytes(), kept_checksum(kv, slot)
    kv.trim()
    assert kv.held_bytes() <= before and kept_checksum(kv, slot) == kept
    kv.free(slot)
    kv.trim()
    assert kv.held_bytes() == 0
    again = kv.acquire_slot()
    kv.ensure(again, 5)
    assert kv.window_floor(again) == 0


def test_export_import_carries_the_window_floor(kv):
    slot, other = kv.acquire_slot(), kv.acquire_slot()
    grow(kv, slot, 1200, step=8)
    floor = kv.window_floor(slot)
    saved = kv.export_slot(slot, 1200)
    assert not saved[:floor, :5].any() and saved[floor:].any()   # nothing invented behind the window
    kv.import_slot(other, saved, window_floor=floor)
    assert kv.window_floor(other) >= floor
    assert kv.can_resume_at(other, 1200) and not kv.can_resume_at(other, floor + WINDOW - 1)
    assert torch.equal(kv.export_slot(other, 1200)[kv.window_floor(other):],
                       saved[kv.window_floor(other):])
    assert kv.held_bytes() < 2 * kv.layout.mapped_bytes_for(1200) / 3
