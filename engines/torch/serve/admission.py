"""The torch engine's side of the broker's budget: a sequence runs only once its KV fits.

A waiting sequence is admitted into a slot only when the pages it may need
(prompt + max_tokens, less what its slot already has mapped) are covered by
*credit* the broker granted: within the model's max_bytes, within the
daemon's budget_bytes (every model's weights and KV), leaving the headroom
free. Pages are still mapped only as tokens arrive; the book (kv_ledger.py)
makes the broker count the promised ones. A sequence that does not fit waits
first in line until memory frees, never fails at once; after `timeout_s` of
waiting it fails with EngineBusy.

The deadlock this is shaped around: the broker reclaims from model B by
running B's verbs between B's steps (B's step lock). If model A asked the
broker while holding its own step lock, and B did the same at once, each
would wait for the other. So the serving worker asks (`request`) holding no
lock, before its step; the broker commits the grant into the book under its
own lock (Broker.admit's commit callback), and the step's scheduler books
sequences only against credit already granted (`gate`).

Before it waits, a model gives back its own cached prefixes (its max_bytes,
or the budget, may be what binds) and asks again. Without a broker handle
everything is admitted, as before (tests, benchmarks/decode.py).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from engines.errors import EngineBusy
from engines.torch.serve.kv_ledger import KVLedger
from engines.torch.serve.scheduler import Scheduler, Sequence
from kvcached.errors import AdmissionDenied

log = logging.getLogger(__name__)

MiB = 1 << 20
RETRY_S = 0.05   # a refused model asks the broker again this often (or when one of its sequences ends)


class MemoryAdmission:
    def __init__(self, name: str, ledger: KVLedger, timeout_s: float,
                 mapped_bytes: Callable[[], int], live_tokens: Callable[[int], int],
                 is_paused: Callable[[], bool], drop_own: Callable[[], int]) -> None:
        """mapped_bytes, live_tokens(slot), is_paused: the KV store's state;
        drop_own: the engine's drop_prefixes (gives back its own cached prefixes)."""
        self.name = name
        self.ledger = ledger
        self.timeout_s = timeout_s
        self.handle = None                 # kvcached.broker.ClientHandle, once registered
        self._mapped_bytes = mapped_bytes
        self._live_tokens = live_tokens
        self.is_paused = is_paused
        self._drop_own = drop_own
        self._retry_at = 0.0
        self._ended = 0                    # bookings ended (sequences finished) so far
        self._ended_seen = 0
        self._last_refusal = ""            # why the broker last said no ("" while granted)

    @property
    def enforced(self) -> bool:
        return self.handle is not None

    # --- the worker, before its step (step lock held: reads the scheduler) -----------
    def shortfall(self, scheduler: Scheduler) -> list[int]:
        """Bytes to ask the broker for, most wanted first: every sequence free slots
        would take now, then the head of the queue alone. [] when credit covers it."""
        if not self.enforced:
            return []
        needs = [self.ledger.need(slot, seq.final_tokens) for seq, slot in scheduler.next_placements()]
        base = self.ledger.resume_need(self._live_tokens) if self.is_paused() else 0
        if not needs and not base:
            return []
        credit = self.ledger.credit
        asks = (base + sum(needs) - credit, base + (needs[0] if needs else 0) - credit)
        return [a for a in dict.fromkeys(asks) if a > 0]

    def expired(self, scheduler: Scheduler, now: float) -> list[tuple[Sequence, EngineBusy]]:
        """Waiting sequences refused memory for longer than the limit, with their error."""
        out = []
        for seq in scheduler.waiting:
            if seq.memory_wait_since is not None and now - seq.memory_wait_since > self.timeout_s:
                need = self.ledger.booking_pages(seq.final_tokens) * self.ledger.page_size
                out.append((seq, EngineBusy(
                    f"model {self.name}: this request waited {now - seq.memory_wait_since:.0f} s for "
                    f"{need / MiB:.1f} MiB of GPU memory for its KV cache; the memory is held by other "
                    "models or applications (or this model's max_bytes is reached). Retry later, "
                    "or unload a model.")))
        return out

    # --- the worker, between steps (no lock held) ------------------------------------
    def request(self, asks: list[int]) -> bool:
        """Ask the broker for credit; True when granted. Refused, the model first gives
        back its own cached prefixes and asks again; still refused, it asks again only
        after RETRY_S, or sooner once one of its own sequences ended."""
        if time.monotonic() < self._retry_at and self._ended == self._ended_seen:
            return False
        self._ended_seen = self._ended
        if any(self._ask(n) for n in asks):
            return True
        if self.ledger.cached_bytes() > 0:
            freed = self._drop_own()
            log.info("%s: gave back its own cached prefixes (%d MiB) to admit a request",
                     self.name, freed // MiB)
            if self._ask(asks[-1]):
                return True
        self._retry_at = time.monotonic() + RETRY_S
        return False

    def _ask(self, nbytes: int) -> bool:
        handle = self.handle
        if handle is None:
            return True
        try:
            handle.admit(nbytes, commit=self.ledger.grant)
        except AdmissionDenied as exc:
            if not self._last_refusal:   # once a wait, not once a retry
                log.info("%s: requests wait for memory: %s", self.name, exc)
            self._last_refusal = str(exc)
            return False
        self._last_refusal = ""
        return True

    # --- inside the step (step lock held) -----------------------------------------
    def gate(self, seq: Sequence, slot: int) -> bool:
        """The scheduler's gate: book the sequence into slot from the credit."""
        if self.ledger.book(slot, seq.final_tokens, enforce=self.enforced):
            return True
        if seq.memory_wait_since is None:
            seq.memory_wait_since = time.monotonic()
        return False

    def settle(self, scheduler: Scheduler) -> None:
        """A step boundary: the book learns what ran and what ended."""
        self._ended += self.ledger.settle(self._mapped_bytes(), [s.slot for s in scheduler.running],
                                          self._live_tokens)
        if not scheduler.waiting and not self.is_paused():
            self.ledger.clear_credit()   # nothing waits: what was granted goes back

    # --- the engine's verbs (between steps) ------------------------------------------
    def after_reclaim(self) -> None:
        """After a trim or drop_prefixes: every slot maps exactly its live tokens."""
        self.ledger.reset(self._mapped_bytes(), self._live_tokens)

    def after_pause(self) -> None:
        self.ledger.reset(0, None)

    def resume_need(self) -> int:
        return self.ledger.resume_need(self._live_tokens)

    def after_resume(self, need: int) -> None:
        self.ledger.take_credit(need)
        self.ledger.reset(self._mapped_bytes(), self._live_tokens)
