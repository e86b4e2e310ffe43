"""The torch engine's scheduler: admission, chunked prefill, decode, cancellation,
driven through random interleavings with hypothesis; invariants after every step."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.errors import ContextOverflow, EngineBusy
from engines.torch.serve.prefix_cache import PrefixCache
from engines.torch.serve.scheduler import Scheduler, Sequence, SeqStatus
from engines.types import FinishReason


def make(num_slots=2, max_ctx=32, chunk=4, max_queue=8) -> Scheduler:
    return Scheduler(PrefixCache(num_slots), max_ctx=max_ctx, prefill_chunk=chunk, max_queue=max_queue)


def check_invariants(s: Scheduler) -> None:
    slots = [q.slot for q in s.running]
    assert len(slots) == len(set(slots)), "a slot runs at most one sequence"
    assert len(s.running) <= len(s.prefix_cache.slots)
    for seq in s.running:
        assert seq.status is SeqStatus.RUNNING
        assert s.prefix_cache.slots[seq.slot].is_running
        assert 0 <= seq.num_cached <= seq.num_computed <= len(seq.tokens)
        if not seq.is_prefilling:
            assert seq.num_computed == len(seq.tokens) - 1, "decode feeds exactly the last token"
        assert len(seq.tokens) <= s.max_ctx
    for seq in s.waiting:
        assert seq.status is SeqStatus.WAITING and seq.slot == -1
    running_slots = {q.slot for q in s.running}
    for i, st_ in enumerate(s.prefix_cache.slots):
        assert st_.is_running == (i in running_slots)


def step(s: Scheduler, token: int) -> None:
    plan = s.schedule()
    check_plan(s, plan)
    s.complete(plan, [token] * len(plan.sampling_sequences()))


def check_plan(s: Scheduler, plan) -> None:
    assert sum(c.end - c.start for c in plan.prefills) <= s.prefill_chunk
    for c in plan.prefills:
        assert c.start == c.seq.num_computed and c.start < c.end <= len(c.seq.prompt)
    for seq in plan.decodes:
        assert seq.num_computed < s.max_ctx, "no position reaches max_ctx"
    seqs = [c.seq for c in plan.prefills] + list(plan.decodes)
    assert len(seqs) == len({q.seq_id for q in seqs})


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(0, 12)),
    st.tuples(st.just("step"), st.integers(0, 3)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("stop"), st.integers(0, 50)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=ops, num_slots=st.integers(1, 4), chunk=st.integers(1, 9))
def test_random_interleavings_keep_invariants(ops, num_slots, chunk):
    s = make(num_slots=num_slots, chunk=chunk, max_queue=6)
    seqs: list[Sequence] = []
    for op in ops:
        if op[0] == "add":
            seq = Sequence(prompt=op[1], max_tokens=op[2])
            try:
                s.add(seq)
                seqs.append(seq)
            except ContextOverflow:
                assert len(op[1]) >= s.max_ctx
            except EngineBusy:
                assert len(s.waiting) >= s.max_queue
        elif op[0] == "step":
            step(s, op[1])
        elif seqs:
            seq = seqs[op[1] % len(seqs)]
            if op[0] == "cancel":
                s.cancel(seq)
                assert seq.finish_reason is not None
            elif seq.status is SeqStatus.RUNNING and seq.output:
                s.finish(seq, FinishReason.STOP)
        check_invariants(s)
    # Whatever happened, the work drains: every sequence ends within a bounded number of steps.
    for _ in range(40 * 6 + 100):
        if not s.has_work:
            break
        step(s, 1)
        check_invariants(s)
    assert not s.has_work
    for seq in seqs:
        assert seq.status is SeqStatus.FINISHED
        if seq.finish_reason is FinishReason.LENGTH:
            assert len(seq.output) == seq.max_tokens
    assert s.prefix_cache.num_running == 0


def test_prefill_is_chunked_and_decodes_run_beside_it():
    s = make(num_slots=2, chunk=4)
    a = Sequence(prompt=[1, 2], max_tokens=5)
    s.add(a)
    step(s, 7)                      # a: whole prompt in one chunk, first token sampled
    assert a.output == [7] and not a.is_prefilling
    b = Sequence(prompt=list(range(10)), max_tokens=3)
    s.add(b)
    plan = s.schedule()
    assert plan.decodes == (a,) and [(c.start, c.end) for c in plan.prefills] == [(0, 4)]
    assert plan.sampling_sequences() == [a]
    s.complete(plan, [8])
    step(s, 0)
    plan = s.schedule()
    assert [(c.start, c.end, c.is_last) for c in plan.prefills] == [(8, 10, True)]
    assert plan.sampling_sequences() == [b, a]


def test_max_tokens_is_cut_to_the_context_and_overflow_is_typed():
    s = make(max_ctx=8)
    seq = Sequence(prompt=[1] * 6, max_tokens=100)
    s.add(seq)
    assert seq.max_tokens == 2
    with pytest.raises(ContextOverflow):
        s.add(Sequence(prompt=[1] * 8, max_tokens=1))
    with pytest.raises(ContextOverflow):
        s.add(Sequence(prompt=[], max_tokens=1))


def test_zero_max_tokens_finishes_at_once():
    s = make()
    seq = Sequence(prompt=[1, 2], max_tokens=0)
    s.add(seq)
    assert seq.status is SeqStatus.FINISHED and seq.finish_reason is FinishReason.LENGTH
    assert not s.has_work


def test_full_queue_answers_busy():
    s = make(num_slots=1, max_queue=1)
    s.add(Sequence(prompt=[1], max_tokens=1))
    with pytest.raises(EngineBusy):
        s.add(Sequence(prompt=[1], max_tokens=1))


def test_next_turn_reuses_the_held_prefix():
    s = make(num_slots=2, chunk=64, max_ctx=64)
    first = Sequence(prompt=[5, 6, 7, 8], max_tokens=3)
    s.add(first)
    while s.has_work:
        step(s, 9)
    assert first.output == [9, 9, 9]
    follow = Sequence(prompt=[5, 6, 7, 8, 9, 9, 3, 4], max_tokens=1)
    s.add(follow)
    plan = s.schedule()
    # The last sampled token was never fed, so its KV is not there: 6 tokens are held.
    assert follow.slot == first.slot and follow.num_cached == 6
    assert [(c.start, c.end) for c in plan.prefills] == [(6, 8)]


def test_cancel_while_waiting_and_while_running():
    s = make(num_slots=1)
    a, b = Sequence(prompt=[1, 2, 3], max_tokens=9), Sequence(prompt=[4], max_tokens=9)
    s.add(a)
    s.add(b)
    step(s, 0)
    s.cancel(b)
    assert b.finish_reason is FinishReason.CANCELLED and not s.waiting
    s.cancel(a)
    assert a.finish_reason is FinishReason.CANCELLED and not s.has_work
    assert s.prefix_cache.held_tokens(0) == 3


@settings(max_examples=200, deadline=None)
@given(prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=6),
       history=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), max_size=3),
       num_slots=st.integers(1, 4))
def test_next_placements_are_what_admission_then_takes(prompts, history, num_slots):
    """Admission weighs memory for the slots next_placements names: they must be the
    slots the scheduler then really gives (a prefix's slot changes what it costs)."""
    s = make(num_slots=num_slots, max_ctx=32, max_queue=16)
    for old in history:                   # finished turns leave prefixes in some slots
        s.add(Sequence(prompt=old, max_tokens=1))
        while s.has_work:
            step(s, 1)
    seqs = [Sequence(prompt=p, max_tokens=2) for p in prompts]
    for seq in seqs:
        s.add(seq)
    placements = [(seq.seq_id, slot) for seq, slot in s.next_placements()]
    assert len(placements) == min(num_slots, len(seqs))
    s.schedule()
    assert [(seq.seq_id, seq.slot) for seq in s.running] == placements


def test_a_refusing_gate_keeps_the_head_first_in_line():
    allowed: set[int] = set()
    asked: list[tuple[int, int]] = []

    def gate(seq: Sequence, slot: int) -> bool:
        asked.append((seq.seq_id, slot))
        return seq.seq_id in allowed

    s = Scheduler(PrefixCache(2), max_ctx=32, prefill_chunk=8, max_queue=8, gate=gate)
    big, small = Sequence(prompt=[1] * 4, max_tokens=20), Sequence(prompt=[2], max_tokens=1)
    s.add(big)
    s.add(small)
    assert s.schedule().is_empty and list(s.waiting) == [big, small]
    assert asked == [(big.seq_id, 0)]     # a small request never jumps the queue
    assert not any(slot.is_running for slot in s.prefix_cache.slots)
    allowed.update({big.seq_id, small.seq_id})
    s.schedule()
    assert s.running == [big, small] and not s.waiting
    check_invariants(s)
