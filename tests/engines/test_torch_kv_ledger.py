"""The KV book (engines/torch/serve/kv_ledger.py) against a model of the KV cache's pages,
driven through random admissions, steps, reuse, finishes and trims with hypothesis.

What must hold: what the cache really maps never exceeds what the book has
committed (so the broker's count bounds the memory), and the commitment never
grows except by an admission (so two models are never promised the same bytes
by a step that maps what it booked)."""
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from engines.torch.serve.kv_ledger import KVLedger

PAGE, TOKENS_PER_PAGE, AHEAD, MAX_CTX, SLOTS = 4096, 8, 4, 64, 3


@dataclass
class Layout:
    page_size: int = PAGE
    max_slots: int = SLOTS
    max_context: int = MAX_CTX

    def pages_for_tokens(self, n_tokens: int) -> int:
        return -(-n_tokens // TOKENS_PER_PAGE)

    def pages_held_at_most(self, n_tokens: int, reach: int) -> int:   # no sliding layers
        return self.pages_for_tokens(n_tokens)

    def pages_held_at_least(self, n_tokens: int) -> int:
        return self.pages_for_tokens(n_tokens)


class Cache:
    """The pages the real KVCache maps: a slot's mapped pages only grow (ensure) until trimmed."""

    def __init__(self) -> None:
        self.live = [0] * SLOTS
        self.mapped = [0] * SLOTS

    def ensure(self, slot: int, n_tokens: int) -> None:
        self.live[slot] = n_tokens
        self.mapped[slot] = max(self.mapped[slot], Layout().pages_for_tokens(n_tokens))

    def trim(self) -> None:
        self.mapped = [Layout().pages_for_tokens(n) for n in self.live]

    @property
    def mapped_bytes(self) -> int:
        return sum(self.mapped) * PAGE


def test_a_booking_covers_the_whole_sequence_and_credit_pays_for_it():
    ledger = KVLedger(Layout(), ensure_ahead=AHEAD)
    assert ledger.booking_pages(9) == 2 and ledger.booking_pages(63) == 8 and ledger.booking_pages(999) == 8
    assert ledger.need(0, 9) == 2 * PAGE
    assert not ledger.book(0, 9)                 # no credit: refused, nothing changed
    ledger.grant(3 * PAGE)
    assert ledger.book(0, 9) and ledger.credit == PAGE
    assert ledger.booked_bytes(0) == 3 * PAGE    # 2 pages promised + 1 of credit
    assert ledger.clear_credit() == PAGE and ledger.booked_bytes(0) == 2 * PAGE
    assert ledger.book(1, 9, enforce=False)      # no broker: booked all the same


ops = st.lists(st.one_of(
    st.tuples(st.just("admit"), st.integers(0, SLOTS - 1), st.integers(1, 80), st.integers(0, 63)),
    st.tuples(st.just("step"), st.integers(1, 12)),
    st.tuples(st.just("finish"), st.integers(0, SLOTS - 1)),
    st.tuples(st.just("trim"),),
), max_size=50)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_mapped_never_exceeds_the_commitment_which_grows_only_by_admission(script):
    ledger, cache = KVLedger(Layout(), ensure_ahead=AHEAD), Cache()
    running: dict[int, list[int]] = {}          # slot -> [tokens computed, final tokens]
    for op in script:
        before = ledger.committed_bytes()
        if op[0] == "admit":
            _, slot, final, reuse = op
            final = min(final, MAX_CTX)
            if slot in running or ledger.is_booked(slot):
                continue
            need = ledger.need(slot, final)
            ledger.grant(need)
            assert ledger.book(slot, final)
            assert ledger.committed_bytes() == before + need
            # The new sequence reuses up to `reuse` tokens of what the slot holds.
            running[slot] = [min(reuse, cache.live[slot], final - 1), final]
            continue
        if op[0] == "step":
            for slot, state in running.items():
                # A step grows the slot toward its final length, AHEAD tokens at a time
                # (the first chunk may shrink a reused slot's live length: reuse < live).
                state[0] = min(state[0] + op[1], state[1])
                cache.ensure(slot, min(-(-state[0] // AHEAD) * AHEAD, MAX_CTX))
                assert cache.mapped_bytes <= before, "a step maps only what was booked"
        elif op[0] == "finish":
            running.pop(op[1], None)
        else:   # trim between steps: every slot maps exactly its live tokens
            cache.trim()
            ledger.reset(cache.mapped_bytes, lambda s: cache.live[s])
        if op[0] != "trim":
            ledger.settle(cache.mapped_bytes, list(running), lambda s: cache.live[s])
        assert ledger.committed_bytes() <= before
        assert cache.mapped_bytes <= ledger.committed_bytes()
        assert cache.mapped_bytes + ledger.booked_bytes(cache.mapped_bytes) == ledger.committed_bytes()
        # What trim + drop_prefixes would take off never leaves less than the bookings.
        bookings = sum(ledger.booking_pages(f) for _, f in running.values()) * PAGE
        assert ledger.committed_bytes() - ledger.cached_bytes() <= max(bookings, cache.mapped_bytes)


def state(ledger: KVLedger) -> tuple:
    return (ledger.credit, ledger.committed_bytes(), ledger.cached_bytes(),
            tuple(ledger.booked_pages(s) for s in range(SLOTS)))


def test_an_open_ended_booking_grows_from_the_credit_and_ends_whole():
    ledger, cache = KVLedger(Layout(), ensure_ahead=AHEAD), Cache()
    ledger.grant(2 * PAGE)
    assert ledger.book(0, 12)                     # 12 tokens -> 16 ahead -> 2 pages
    cache.ensure(0, 16)
    ledger.settle(cache.mapped_bytes, [0], lambda s: cache.live[s])
    assert ledger.need(0, 20) == PAGE             # growing to 20 tokens (24 ahead): one page more
    before = state(ledger)
    assert not ledger.extend(0, 20)               # no credit: refused, nothing changed
    assert state(ledger) == before
    ledger.grant(PAGE)
    assert ledger.extend(0, 20) and ledger.credit == 0 and ledger.booked_pages(0) == 3
    assert ledger.extend(0, 10) and ledger.booked_pages(0) == 3   # a booking never shrinks
    assert ledger.committed_bytes() == 3 * PAGE
    ledger.settle(cache.mapped_bytes, [], lambda s: cache.live[s])   # it ended: its unmapped page goes
    assert ledger.committed_bytes() == 2 * PAGE == cache.mapped_bytes


budget_ops = st.lists(st.one_of(
    st.tuples(st.just("grant"), st.integers(0, 4 * PAGE)),
    st.tuples(st.just("book"), st.integers(0, SLOTS - 1), st.integers(1, 80), st.integers(0, 63)),
    st.tuples(st.just("extend"), st.integers(0, SLOTS - 1), st.integers(1, 24)),
    st.tuples(st.just("step"), st.integers(1, 12)),
    st.tuples(st.just("finish"), st.integers(0, SLOTS - 1)),
    st.tuples(st.just("trim"),),
    st.tuples(st.just("clear"),),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(budget_ops)
def test_bookings_are_paid_by_grants_and_give_back_exactly_what_they_booked(script):
    """Through grants, bookings, growth, steps, finishes, trims and credit returns:
    nothing is ever negative; what the commitment grows by is exactly what credit
    paid (so booked <= granted); a refused booking changes nothing; an ended
    booking gives back exactly its unmapped pages; the cache maps within the book."""
    ledger, cache = KVLedger(Layout(), ensure_ahead=AHEAD), Cache()
    running: dict[int, list[int]] = {}            # slot -> [tokens computed, tokens booked]
    granted = paid = returned = 0
    for op in script:
        before, committed = state(ledger), ledger.committed_bytes()
        kind = op[0]
        if kind == "grant":
            ledger.grant(op[1])
            granted += op[1]
        elif kind in ("book", "extend"):
            slot = op[1]
            if (kind == "book") == (slot in running):
                continue
            tokens = min(op[2] if kind == "book" else running[slot][1] + op[2], MAX_CTX)
            need = ledger.need(slot, tokens)
            ok = ledger.book(slot, tokens) if kind == "book" else ledger.extend(slot, tokens)
            assert ok == (need <= before[0])
            if not ok:
                assert state(ledger) == before     # refused: nothing changed
                continue
            paid += need
            assert ledger.committed_bytes() == committed + need and ledger.credit == before[0] - need
            if kind == "book":
                running[slot] = [min(op[3], cache.live[slot], tokens - 1), tokens]
            else:
                running[slot][1] = max(running[slot][1], tokens)
        elif kind == "step":                       # each sequence grows inside its booking
            for slot, seq in running.items():
                seq[0] = min(seq[0] + op[1], seq[1])
                cache.ensure(slot, min(-(-seq[0] // AHEAD) * AHEAD, MAX_CTX))
            ledger.settle(cache.mapped_bytes, list(running), lambda s: cache.live[s])
            assert ledger.committed_bytes() <= committed
        elif kind == "finish" and op[1] in running:
            slot = op[1]
            ledger.settle(cache.mapped_bytes, list(running), lambda s: cache.live[s])   # a boundary first
            committed = ledger.committed_bytes()
            unmapped = max(0, ledger.booked_pages(slot) - ledger._floor[slot]) * PAGE  # booked, not mapped
            del running[slot]
            ledger.settle(cache.mapped_bytes, list(running), lambda s: cache.live[s])
            assert not ledger.is_booked(slot)
            assert ledger.committed_bytes() == committed - unmapped     # exactly what it booked goes
        elif kind == "trim":
            cache.trim()
            ledger.reset(cache.mapped_bytes, lambda s: cache.live[s])
        elif kind == "clear":
            returned += ledger.clear_credit()
            assert ledger.credit == 0
        assert min(ledger.credit, ledger.committed_bytes(), ledger.cached_bytes(),
                   ledger.booked_bytes(cache.mapped_bytes)) >= 0
        assert granted == paid + ledger.credit + returned          # booked <= granted, exactly paid
        assert cache.mapped_bytes <= ledger.committed_bytes()
        for slot, (computed, booked) in running.items():
            assert ledger.booked_pages(slot) >= ledger.booking_pages(booked) >= 1
