"""The sliding-window page plans (kv_cache/window.py), checked with hypothesis (no torch):
whatever steps a slot takes, every key a step reads is on a mapped page, a part's mapped
pages stay one range, and pages behind the window are given back."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcached.errors import WindowMoved
from kvcached.kv_cache import window
from kvcached.kv_cache.layout import KVLayout, KVShape
from kvcached.kv_cache.placement import SlotState, SlotTable

PAGE = 64 * 1024


def layout_with(windows: tuple[int, ...], max_context: int = 600) -> KVLayout:
    # 2 heads x 64 dims fp16: 512 bytes a layer a token, so a page holds 128 tokens of one layer.
    return KVLayout(KVShape(len(windows), 2, 64, "float16", windows), 2, max_context, PAGE)


def part_range(layout: KVLayout, part, first_token: int, n_tokens: int) -> set[int]:
    """Absolute pages of slot 1 holding bytes of this part's tokens [first_token, n_tokens)."""
    if n_tokens <= first_token:
        return set()
    tb = window.part_token_bytes(layout, part)
    base = layout.part_first_page(1, part)
    return set(range(base + first_token * tb // PAGE, base + -(-n_tokens * tb // PAGE)))


def apply(layout: KVLayout, state: SlotState, mapped: set[int], n: int, start: int) -> None:
    plan = window.plan_ensure(layout, 1, state, n, start)
    for first, count in plan.map:
        assert not mapped & set(range(first, first + count)), "maps only unmapped pages"
        mapped |= set(range(first, first + count))
    for first, count in plan.unmap:
        assert set(range(first, first + count)) <= mapped, "gives back only mapped pages"
        mapped -= set(range(first, first + count))
    state.parts, state.num_tokens = list(plan.parts), n


windows_st = st.sampled_from([(0, 40, 0, 40), (40, 40, 40), (0, 300), (100, 0, 100, 0, 100, 0)])


@settings(max_examples=300, deadline=None)
@given(windows_st, st.lists(st.tuples(st.integers(0, 600), st.integers(0, 3)), min_size=1, max_size=25))
def test_every_key_a_step_reads_stays_mapped(windows, steps):
    layout = layout_with(windows)
    table = SlotTable(2, len(layout.parts))
    table.acquire(1)
    state, mapped = table.slots[1], set()
    for n, how in steps:
        a = state.num_tokens
        start = (min(a, n), 0, min(a, n) // 2, max(0, min(a, n) - 1))[how]
        if not window.can_resume_at(layout, state, start):
            with pytest.raises(WindowMoved):
                window.plan_ensure(layout, 1, state, n, start)
            continue
        apply(layout, state, mapped, n, start)
        ranges = set()
        for part, pages in zip(layout.parts, state.parts):
            base = layout.part_first_page(1, part)
            ranges |= set(range(base + pages.floor, base + pages.end))
            read_from = max(0, start - part.window) if part.window else 0
            assert part_range(layout, part, read_from, n) <= mapped
            if part.window:   # nothing wholly behind the window stays
                assert pages.floor >= window.releasable_floor(layout, part, start)
            else:
                assert pages.floor == 0
        assert ranges == mapped
        assert window.can_resume_at(layout, state, start)


def test_a_long_sequence_keeps_about_its_window_of_sliding_pages():
    layout = layout_with((0, 40, 40, 40, 40, 40))     # Gemma-3-like: 5 of 6 layers slide
    table = SlotTable(2, len(layout.parts))
    table.acquire(1)
    state, mapped = table.slots[1], set()
    for n in range(1, 601):
        apply(layout, state, mapped, n, n - 1)       # one decode step a token
    assert state.parts[0].end - state.parts[0].floor == layout.part_pages(600)[0]
    # 5 layers x 512 bytes = 2560 bytes a token: the window's 40 tokens plus one page's slack.
    assert state.parts[1].end - state.parts[1].floor <= -(-41 * 2560 // PAGE) + 1
    assert window.window_floor(layout, state) > 0
    assert window.can_resume_at(layout, state, 600)
    assert not window.can_resume_at(layout, state, 100)
    assert window.can_resume_at(layout, state, 0)


def test_a_step_from_token_zero_gives_the_old_window_back():
    layout = layout_with((40,))
    table = SlotTable(2, 1)
    table.acquire(1)
    state, mapped = table.slots[1], set()
    for n in range(1, 601):
        apply(layout, state, mapped, n, n - 1)
    apply(layout, state, mapped, 10, 0)             # a new sequence in the slot
    assert mapped == set(range(layout.first_page(1), layout.first_page(1) + 1))
    assert window.window_floor(layout, state) == 0
