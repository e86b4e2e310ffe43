"""The bounds a KV budget books with (KVLayout.pages_held_at_most / pages_held_at_least)
hold what a real KVCache on the host backend maps, step by step, as slots with sliding
layers grow by prefill chunks and decode steps: booking a windowed model's whole context
would ask the broker for ~5x what Gemma 3 keeps at 32k tokens (window_kv_host.json)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcached.config import KvcachedConfig
from kvcached.kv_cache.layout import KVLayout, KVShape
from kvcached.kv_cache.manager import KVCache
from kvcached.vmm import open_backend

PAGE = 64 * 1024
MAX_CTX = 2048
CONFIG = KvcachedConfig(backend="host", page_size=PAGE, reserve_pages=0)
SHAPES = {
    "gemma3-like": KVShape(6, 2, 64, "float16", (64,) * 5 + (0,)),
    "all-sliding": KVShape(4, 2, 64, "float16", (100,) * 4),
    "no-window": KVShape(4, 2, 64, "float16"),
}


def held_pages(kv: KVCache) -> int:
    return kv.held_bytes() // PAGE


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(SHAPES)), chunk=st.integers(1, 300),
       steps=st.lists(st.integers(1, 300), min_size=1, max_size=30))
def test_a_growing_slot_holds_within_the_bounds(name: str, chunk: int, steps: list[int]) -> None:
    shape = SHAPES[name]
    with open_backend(CONFIG) as backend, KVCache(backend, shape, 1, MAX_CTX, config=CONFIG) as kv:
        layout = kv.layout
        slot = kv.acquire_slot()
        n = 0
        for ask in steps:
            step = min(ask, chunk, MAX_CTX - n)
            if step <= 0:
                break
            kv.ensure(slot, n + step, start=n)
            n += step
            held = held_pages(kv)
            assert layout.pages_held_at_least(n) <= held <= layout.pages_held_at_most(n, chunk)


def test_without_sliding_layers_the_bounds_are_the_pages_of_the_tokens() -> None:
    layout = KVLayout(SHAPES["no-window"], 1, MAX_CTX, PAGE)
    for n in (0, 1, 100, 129, MAX_CTX):
        assert layout.pages_held_at_most(n, 512) == layout.pages_held_at_least(n) == layout.pages_for_tokens(n)


def test_a_long_windowed_slot_books_its_window_not_its_context() -> None:
    layout = KVLayout(SHAPES["gemma3-like"], 1, MAX_CTX, PAGE)
    booked, full = layout.pages_held_at_most(MAX_CTX, 16), layout.pages_for_tokens(MAX_CTX)
    assert layout.pages_held_at_least(MAX_CTX) <= booked < full / 3


@pytest.mark.parametrize("reach", [1, 512])
def test_the_bound_never_exceeds_the_tokens_pages(reach: int) -> None:
    layout = KVLayout(SHAPES["gemma3-like"], 1, MAX_CTX, PAGE)
    for n in range(0, MAX_CTX + 1, 37):
        assert layout.pages_held_at_least(n) <= layout.pages_held_at_most(n, reach) <= layout.pages_for_tokens(n)
