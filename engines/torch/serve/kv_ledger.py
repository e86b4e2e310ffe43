"""The torch engine's KV book: what each running sequence may still map, in pages.

Pages are mapped only as tokens arrive (elasticity), but a sequence admitted
under the broker's budget must never fail midway for lack of memory. So when a
sequence is admitted into a slot it *books* the pages its prompt + max_tokens
can need, and the model's held bytes as the broker sees them count those
booked-but-unmapped pages: two models are never promised the same memory.

Per slot the book keeps a *floor*: pages known to be mapped there (a lower
bound: the pages of the slot's live tokens when last observed; exact after a
trim, a pause or a resume, which the engine reports). A running sequence that
booked B pages may still map at most max(0, B - floor) more, so

    committed = mapped + sum over running slots of max(0, B - floor)

bounds what the model can hold before its next admission. It only falls
between admissions: a step maps inside the bookings and the floors rise with
what it mapped. `mapped` is read at step boundaries (settle), never mid-step,
so a page a step just mapped is never counted twice.

*Credit* is what the broker granted the serving worker before a step (granted
under the broker's lock, counted here at once) and not yet booked; booking
consumes it. Pure bookkeeping, no torch (CONVENTIONS 3); thread-safe (the
broker's thread reads it while the worker books).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Protocol


class PageLayout(Protocol):
    """What the book needs of kvcached's KVLayout."""
    page_size: int
    max_slots: int
    max_context: int

    def pages_for_tokens(self, n_tokens: int) -> int: ...


class KVLedger:
    def __init__(self, layout: PageLayout, ensure_ahead: int = 1) -> None:
        """ensure_ahead: the store maps a growing slot this many tokens at a time
        (KvcachedStore.ENSURE_AHEAD), so a booking rounds up to it."""
        assert ensure_ahead >= 1
        self.layout = layout
        self.page_size = layout.page_size
        self.ensure_ahead = ensure_ahead
        self._lock = threading.Lock()
        self._floor = [0] * layout.max_slots    # pages known mapped per slot
        self._booked = [0] * layout.max_slots   # pages booked by the slot's running sequence
        self._credit = 0                        # bytes granted, not booked yet
        self._mapped = 0                        # mapped bytes at the last boundary

    # --- sizes -----------------------------------------------------------------
    def booking_pages(self, final_tokens: int) -> int:
        """Pages a sequence of final_tokens tokens (prompt + max_tokens) may map."""
        ahead = self.ensure_ahead
        tokens = min(-(-final_tokens // ahead) * ahead, self.layout.max_context)
        return self.layout.pages_for_tokens(tokens)

    def need(self, slot: int, final_tokens: int) -> int:
        """Bytes admitting such a sequence into `slot` adds to the commitment."""
        with self._lock:
            return max(0, self.booking_pages(final_tokens) - self._floor[slot]) * self.page_size

    def resume_need(self, live_tokens: Callable[[int], int]) -> int:
        """Bytes a resume maps beyond the bookings: the free slots' cached tokens."""
        with self._lock:
            free = [s for s, b in enumerate(self._booked) if not b]
        return sum(self.layout.pages_for_tokens(live_tokens(s)) for s in free) * self.page_size

    # --- credit and bookings ----------------------------------------------------
    def grant(self, nbytes: int) -> None:
        """The broker admitted nbytes (its commit callback, under its lock)."""
        with self._lock:
            self._credit += nbytes

    @property
    def credit(self) -> int:
        with self._lock:
            return self._credit

    def take_credit(self, nbytes: int) -> None:
        """nbytes were used outside a booking (a resume): as much credit goes."""
        with self._lock:
            self._credit = max(0, self._credit - nbytes)

    def clear_credit(self) -> int:
        """Give unused credit back (nothing waits any more); returns it."""
        with self._lock:
            credit, self._credit = self._credit, 0
            return credit

    def book(self, slot: int, final_tokens: int, enforce: bool = True) -> bool:
        """Book a sequence into slot from the credit; False (nothing changed) when
        the credit does not cover it and `enforce` (a broker is attached)."""
        with self._lock:
            assert not self._booked[slot], f"slot {slot} is booked twice"
            pages = self.booking_pages(final_tokens)
            need = max(0, pages - self._floor[slot]) * self.page_size
            if enforce and need > self._credit:
                return False
            self._credit = max(0, self._credit - need)
            self._booked[slot] = pages
            return True

    # --- boundaries ---------------------------------------------------------------
    def settle(self, mapped_bytes: int, running: Iterable[int], live_tokens: Callable[[int], int]) -> int:
        """A step boundary: raise the floors of the slots that ran (their live tokens are
        mapped), end the bookings of slots no longer running, note what is mapped.
        Returns how many bookings ended."""
        running = set(running)
        with self._lock:
            touched = running | {s for s, b in enumerate(self._booked) if b}
        pages = {s: self.layout.pages_for_tokens(live_tokens(s)) for s in touched}
        ended = 0
        with self._lock:
            for slot, n in pages.items():
                self._floor[slot] = max(self._floor[slot], n)
                if slot not in running and self._booked[slot]:
                    self._booked[slot] = 0
                    ended += 1
            self._mapped = mapped_bytes
        return ended

    def reset(self, mapped_bytes: int, live_tokens: Callable[[int], int] | None) -> None:
        """After a trim or resume (every slot maps exactly its live tokens) or a pause
        (live_tokens None: nothing is mapped)."""
        slots = range(self.layout.max_slots)
        pages = [0 if live_tokens is None else self.layout.pages_for_tokens(live_tokens(s)) for s in slots]
        with self._lock:
            self._floor = pages
            self._mapped = mapped_bytes

    # --- what the broker reads ------------------------------------------------------
    def committed_bytes(self) -> int:
        """KV this model may hold before its next admission (credit not included)."""
        with self._lock:
            return self._committed_locked()

    def _committed_locked(self) -> int:
        unmapped = sum(max(0, b - f) for b, f in zip(self._booked, self._floor) if b)
        return self._mapped + unmapped * self.page_size

    def booked_bytes(self, mapped_now: int) -> int:
        """Promised but not mapped: counted on top of the mapped bytes as held."""
        with self._lock:
            return max(0, self._committed_locked() - mapped_now) + self._credit

    def cached_bytes(self) -> int:
        """What trim + drop_prefixes take off the commitment: everything but the
        running sequences' bookings."""
        with self._lock:
            running = sum(min(b, f) for b, f in zip(self._booked, self._floor) if b)
            return max(0, self._mapped - running * self.page_size)

    def is_booked(self, slot: int) -> bool:
        with self._lock:
            return bool(self._booked[slot])
