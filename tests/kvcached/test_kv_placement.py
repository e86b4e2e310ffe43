"""Fragmentation-aware slot choice and slot bookkeeping (no torch)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcached.errors import InvalidArgument, PoolExhausted
from kvcached.kv_cache.placement import SlotTable


def table_with(mapped: list[int], live: set[int] = frozenset()) -> SlotTable:
    table = SlotTable(len(mapped))
    for i, pages in enumerate(mapped):
        table.slots[i].parts[0].end = pages
        table.slots[i].is_live = i in live
    return table


def test_prefers_a_slot_whose_pages_are_mapped():
    assert table_with([0, 0, 3, 1]).choose() == 2
    assert table_with([0, 0, 3, 1], live={2}).choose() == 3


def test_best_fit_with_a_size_hint():
    table = table_with([5, 2, 3, 0])
    assert table.choose(needed_pages=3) == 2      # smallest that covers 3 pages
    assert table.choose(needed_pages=9) == 0      # none covers: the largest


def test_prefer_mapped_false_takes_the_emptiest():
    assert table_with([5, 0, 3]).choose(prefer_mapped=False) == 1


def test_all_live_is_pool_exhausted():
    with pytest.raises(PoolExhausted):
        table_with([1, 1], live={0, 1}).choose()


def test_acquire_release_and_bad_slots():
    table = SlotTable(2)
    table.acquire(1)
    table.slots[1].num_tokens = 7
    assert table.live_tokens() == 7
    table.release(1)
    assert table.live_tokens() == 0
    with pytest.raises(InvalidArgument):
        table.release(1)
    with pytest.raises(InvalidArgument):
        table.get(2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.integers(0, 12)), min_size=1, max_size=8))
def test_trimmable_keeps_exactly_the_pages_of_live_tokens(states):
    def pages_for(n: int) -> int:
        return -(-n // 4)

    table = SlotTable(len(states))
    for s, (live, tokens, mapped) in zip(table.slots, states):
        s.is_live, s.num_tokens = live, tokens if live else 0
        s.parts[0].end = max(mapped, pages_for(s.num_tokens))
    cut = {slot: (first, count) for slot, _, first, count in table.trimmable(lambda n: (pages_for(n),))}
    for i, s in enumerate(table.slots):
        keep = pages_for(s.num_tokens) if s.is_live else 0
        assert cut.get(i, (keep, 0)) == (keep, s.mapped_pages - keep)
