"""The torch engine's KV book: what each running sequence may still map, in pages.

Pages are mapped only as tokens arrive (elasticity), but a sequence admitted
under the broker's budget must never map memory nobody granted. So a sequence
entering a slot *books* the pages its tokens can need (prompt + max_tokens; an
open-ended answer books a chunk at a time, see kv_budget.py), and the model's
held bytes as the broker sees them count those booked-but-unmapped pages: two
models are never promised the same memory.

Per slot the book keeps a *floor*: pages known to be mapped there (a lower
bound: the pages of the slot's live tokens when last observed; exact after a
trim, a pause or a resume, which the engine reports). A running sequence that
booked B pages may still map at most max(0, B - floor) more, so

    committed = mapped + sum over running slots of max(0, B - floor)

bounds what the model can hold before its next booking. It only falls between
bookings: a step maps inside the bookings and the floors rise with what it
mapped. `mapped` is read at step boundaries (settle), never mid-step, so a page
a step just mapped is never counted twice.

*Credit* is what the broker granted before a step and not booked yet; booking
(a new sequence, or a running one's booking growing) consumes it.

Pure bookkeeping: no torch, no clock, no lock (CONVENTIONS 3). Its one owner,
KVBudget, makes every call under its own lock, so tests drive it directly.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol


class PageLayout(Protocol):
    """What the book needs of kvcached's KVLayout."""
    page_size: int
    max_slots: int
    max_context: int

    def pages_held_at_most(self, n_tokens: int, reach: int) -> int: ...

    def pages_held_at_least(self, n_tokens: int) -> int: ...


class KVLedger:
    def __init__(self, layout: PageLayout, ensure_ahead: int = 1, step_tokens: int = 1) -> None:
        """ensure_ahead: the store maps a growing slot this many tokens at a time
        (KvcachedStore.ENSURE_AHEAD), so a booking rounds up to it. step_tokens: the most
        tokens one step writes to a slot (the prefill chunk): with sliding-window layers
        a slot holds their window plus that much, not all its tokens (layout's bounds)."""
        assert ensure_ahead >= 1 and step_tokens >= 1
        self.layout = layout
        self.page_size = layout.page_size
        self.ensure_ahead = ensure_ahead
        self.reach = step_tokens + ensure_ahead
        self.credit = 0                          # bytes granted, not booked yet
        self._floor = [0] * layout.max_slots     # pages known mapped per slot
        self._booked = [0] * layout.max_slots    # pages booked by the slot's running sequence (0: none)
        self._mapped = 0                         # mapped bytes at the last boundary

    # --- sizes -----------------------------------------------------------------
    def booking_pages(self, tokens: int) -> int:
        """Pages a slot holding `tokens` tokens may map."""
        ahead = self.ensure_ahead
        rounded = min(-(-tokens // ahead) * ahead, self.layout.max_context)
        return self.layout.pages_held_at_most(rounded, self.reach)

    def need(self, slot: int, tokens: int) -> int:
        """Bytes booking `tokens` in `slot` adds to the commitment (a new booking, or a
        running one grown to cover `tokens`)."""
        have = max(self._booked[slot], self._floor[slot])
        return max(0, self.booking_pages(tokens) - have) * self.page_size

    def resume_need(self, live_tokens: Callable[[int], int]) -> int:
        """Bytes a resume maps beyond the bookings: the free slots' cached tokens."""
        free = (s for s, b in enumerate(self._booked) if not b)
        return sum(self.layout.pages_held_at_most(live_tokens(s), self.reach) for s in free) * self.page_size

    # --- credit and bookings ----------------------------------------------------
    def grant(self, nbytes: int) -> None:
        """The broker admitted nbytes."""
        assert nbytes >= 0
        self.credit += nbytes

    def take_credit(self, nbytes: int) -> None:
        """nbytes were used outside a booking (a resume): as much credit goes."""
        self.credit = max(0, self.credit - nbytes)

    def clear_credit(self) -> int:
        """Give unused credit back (nothing waits any more); returns it."""
        credit, self.credit = self.credit, 0
        return credit

    def book(self, slot: int, tokens: int, enforce: bool = True) -> bool:
        """A sequence enters `slot`, booking pages for `tokens` from the credit.
        False (nothing changed) when the credit does not cover it and `enforce`."""
        assert not self._booked[slot], f"slot {slot} is booked twice"
        return self._take(slot, tokens, enforce)

    def extend(self, slot: int, tokens: int, enforce: bool = True) -> bool:
        """The sequence running in `slot` grows its booking to cover `tokens`."""
        assert self._booked[slot], f"slot {slot} has no booking to extend"
        return self._take(slot, tokens, enforce)

    def _take(self, slot: int, tokens: int, enforce: bool) -> bool:
        pages = self.booking_pages(tokens)
        need = max(0, pages - max(self._booked[slot], self._floor[slot])) * self.page_size
        if enforce and need > self.credit:
            return False
        self.credit = max(0, self.credit - need)
        self._booked[slot] = max(self._booked[slot], pages)
        return True

    # --- boundaries ---------------------------------------------------------------
    def settle(self, mapped_bytes: int, running: Collection[int], live_tokens: Callable[[int], int]) -> int:
        """A step boundary: raise the floors of the slots that ran (their live tokens are
        mapped), end the bookings of slots no longer running, note what is mapped.
        Returns how many bookings ended."""
        floor, booked, pages_for = self._floor, self._booked, self.layout.pages_held_at_least
        ended = 0
        for slot in range(len(booked)):
            is_running = slot in running
            if not (is_running or booked[slot]):
                continue
            floor[slot] = max(floor[slot], pages_for(live_tokens(slot)))
            if not is_running:
                booked[slot] = 0
                ended += 1
        self._mapped = mapped_bytes
        return ended

    def reset(self, mapped_bytes: int, live_tokens: Callable[[int], int] | None) -> None:
        """After a trim or resume (every slot maps exactly its live tokens) or a pause
        (live_tokens None: nothing is mapped)."""
        pages_for = self.layout.pages_held_at_least
        self._floor = [0 if live_tokens is None else pages_for(live_tokens(s))
                       for s in range(self.layout.max_slots)]
        self._mapped = mapped_bytes

    # --- what the broker reads ------------------------------------------------------
    def committed_bytes(self) -> int:
        """KV this model may hold before its next booking (credit not included)."""
        unmapped = sum(max(0, b - f) for b, f in zip(self._booked, self._floor) if b)
        return self._mapped + unmapped * self.page_size

    def booked_bytes(self, mapped_now: int) -> int:
        """Promised but not mapped: counted on top of the mapped bytes as held."""
        return max(0, self.committed_bytes() - mapped_now) + self.credit

    def cached_bytes(self) -> int:
        """What trim + drop_prefixes take off the commitment: everything but the
        running sequences' bookings."""
        running = sum(min(b, f) for b, f in zip(self._booked, self._floor) if b)
        return max(0, self._mapped - running * self.page_size)

    def booked_pages(self, slot: int) -> int:
        return self._booked[slot]

    def is_booked(self, slot: int) -> bool:
        return bool(self._booked[slot])
