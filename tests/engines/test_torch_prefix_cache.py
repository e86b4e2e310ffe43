"""Prefix reuse bookkeeping: which slot a prompt goes to and how much is reused."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engines.torch.serve.prefix_cache import PrefixCache, common_prefix_len


def test_longest_shared_prefix_wins_and_one_token_is_left():
    pc = PrefixCache(3)
    for tokens in ([1, 2, 3], [1, 2, 3, 4, 5], [9]):
        slot, _ = pc.acquire(tokens)
        pc.release(slot, tokens)
    slot, reuse = pc.acquire([1, 2, 3, 4, 5])
    assert pc.slots[slot].tokens == [1, 2, 3, 4] and reuse == 4  # the last token is recomputed for its logits


def test_no_prefix_takes_empty_then_least_recent():
    pc = PrefixCache(2)
    a, _ = pc.acquire([1, 2])
    pc.release(a, [1, 2])
    b, reuse = pc.acquire([7, 8])
    assert b != a and reuse == 0
    pc.release(b, [7, 8])
    c, reuse = pc.acquire([5])
    assert c == a and reuse == 0          # slot a was used least recently


def test_all_running_gives_none_and_drop_forgets_idle_only():
    pc = PrefixCache(2)
    a, _ = pc.acquire([1])
    b, _ = pc.acquire([2])
    assert pc.acquire([3]) is None
    pc.release(a, [1, 4])
    assert pc.drop_all() == [a]
    assert pc.held_tokens(a) == 0


@settings(max_examples=200, deadline=None)
@given(prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=8), max_size=20), n=st.integers(1, 3))
def test_reuse_is_always_a_true_prefix(prompts, n):
    pc = PrefixCache(n)
    for p in prompts:
        held = {i: list(s.tokens) for i, s in enumerate(pc.slots)}
        slot, reuse = pc.acquire(p)
        assert reuse <= len(p) - 1 and held[slot][:reuse] == p[:reuse]
        assert reuse == 0 or reuse == min(common_prefix_len(held[slot], p), len(p) - 1)
        pc.release(slot, p)


def test_a_prefix_the_window_moved_past_is_recomputed():
    # Slot 0 holds 10 tokens but gave back sliding keys before token 6 (window 4):
    # continuing at 8 would read keys 4..7, so only a prefix of 10 there is usable.
    def can_resume_at(slot: int, n: int) -> bool:
        return slot != 0 or n >= 6 + 4

    pc = PrefixCache(2, can_resume_at=can_resume_at)
    pc.hold(0, list(range(10)))
    pc.hold(1, [0, 1, 2])
    assert pc.choose(list(range(8)) + [99]) == (1, 3)         # slot 0's 8 are cut; slot 1's 3 serve
    assert pc.choose(list(range(10)) + [99]) == (0, 10)       # the whole held prefix still serves
    pc.forget(1)
    assert pc.choose(list(range(8)) + [99]) == (1, 0)         # nothing usable: recomputed, empty slot
