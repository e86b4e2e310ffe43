"""The torch engine's KV budget: the one way a sequence's KV gets memory.

A sequence takes a slot only once the pages it may need are covered by
*credit* the broker granted: within the model's max_bytes, within the daemon's
budget_bytes (every model's weights and KV), leaving the headroom free. Pages
are still mapped only as tokens arrive; the book (kv_ledger.py, pure) makes the
broker count the promised ones. Two entry points, both on the serving worker:

- `before_step`: may the waiting sequences enter (and the running open-ended
  ones grow)? It reads what they need under the step lock, then asks the
  broker holding no lock. Refused, the model first gives back its own cached
  prefixes and asks again; a sequence that still does not fit waits first in
  line, never fails at once; past `timeout_s` of waiting it fails with
  EngineBusy (the HTTP layer's 503).
- `settle`, after a step: the book learns what ran, what mapped and what ended.

Inside the step the scheduler pays from the credit through `admit` (its gate:
a sequence takes a slot) and `grow` (a running answer's booking covers its
next token).

The deadlock this is shaped around: the broker reclaims from model B by
running B's verbs between B's steps (B's step lock). If model A asked the
broker while holding its own step lock, and B did the same at once, each
would wait for the other. So the worker asks holding no lock; the broker
commits the grant into the book under its own lock (Broker.admit's commit
callback, here `_grant`), and the step books only against credit already
granted.

Open-ended answers (the client set no max_tokens, `Sequence.open_ended`) do
not book the whole context up front: that would let one chat request hold a
128k context's KV against every other model. They book the prompt and
`grow_tokens` ahead, and when the next token would pass the booking it grows
by another `grow_tokens` (one broker ask per chunk, not per token). The rule
when the broker cannot grant more mid-answer: the answer *pauses* (sits steps
out, its slot and pages kept, the other sequences run on) until memory frees,
bounded by the same `timeout_s`; past it the answer ends with finish_reason
"length", with every token it produced, as if its context were full. So a
request in flight is never failed by memory it was not promised (the design's
"a request either finishes or waits"), and no answer waits forever. An answer
with max_tokens books all of it at entry and never pauses.

Threads: the worker (before_step, admit, grow, settle, and `_grant` under the
broker's lock), the engine's verbs (after_reclaim/pause/resume, between steps,
on the broker's or a control thread), memory reads (any thread). One lock
here serializes them over the ledger; a steady decode step takes it once
(settle), and the check before it takes no lock at all.
Without a broker handle everything is admitted and grows freely (tests,
benchmarks).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from engines.errors import EngineBusy
from engines.torch.serve.kv_ledger import KVLedger, PageLayout
from engines.torch.serve.scheduler import Scheduler, Sequence
from kvcached.errors import AdmissionDenied

log = logging.getLogger(__name__)

MiB = 1 << 20
RETRY_S = 0.05       # a refused model asks the broker again this often (or when one of its sequences ends)
GROW_TOKENS = 256    # an open-ended answer books this many tokens ahead, a chunk at a time


class PageStore(Protocol):
    """What the budget reads of the KV store (engines.torch.serve.kv_access.KvcachedStore)."""
    layout: PageLayout

    @property
    def held_bytes(self) -> int: ...

    def live_tokens(self, slot: int) -> int: ...


class KVBudget:
    def __init__(self, name: str, store: PageStore, timeout_s: float, drop_own: Callable[[], int],
                 ensure_ahead: int = 1, grow_tokens: int = GROW_TOKENS,
                 away_bytes: Callable[[], int] | None = None, step_tokens: int = 1) -> None:
        """drop_own: the engine's drop_prefixes (gives back its own cached prefixes).
        away_bytes: the weights' bytes in host memory (weights_to_host), which a resume
        maps again: asked of the broker with the paused KV. step_tokens: the most tokens one
        step writes to a slot (KVLedger: what a sliding-window slot holds beyond its window)."""
        assert grow_tokens >= 1
        self.name = name
        self.timeout_s = timeout_s
        self.grow_tokens = grow_tokens
        self.handle = None                 # kvcached.broker.ClientHandle, once registered
        self.ledger = KVLedger(store.layout, ensure_ahead, step_tokens)
        self._store = store
        self._drop_own = drop_own
        self._away_bytes = away_bytes or (lambda: 0)
        self._lock = threading.Lock()      # the one lock over the ledger
        self._is_paused = False
        self._retry_at = 0.0
        self._ended = 0                    # bookings ended (sequences finished) so far
        self._ended_seen = 0
        self._last_refusal = ""            # why the broker last said no ("" while granted)

    @property
    def enforced(self) -> bool:
        return self.handle is not None

    def target(self, seq: Sequence, tokens: int) -> int:
        """Tokens seq's booking covers once it holds `tokens`: all it may ever hold,
        or for an open-ended answer `grow_tokens` ahead."""
        if not seq.open_ended:
            return seq.final_tokens
        return min(seq.final_tokens, tokens + self.grow_tokens)

    # --- 1. before a step (the worker; asks holding no lock) ----------------------------
    def before_step(self, scheduler: Scheduler, step_lock: threading.RLock) -> bool:
        """May the waiting sequences enter and the growing ones grow? True: step now
        (what was granted is booked inside the step). False: refused with nothing able
        to run; the caller waits a little and asks again."""
        if self.handle is None or not (scheduler.waiting or self._is_paused or _due(scheduler.running)):
            return True   # read without the lock: only this thread changes the queue
        with step_lock:
            asks, due = self._shortfall(scheduler)
            can_run = not self._is_paused and len(due) < len(scheduler.running)
            head = scheduler.waiting[0] if scheduler.waiting else None
        if not asks or self._request(asks):
            return True
        now = time.monotonic()
        for seq in (*due, head):   # their clocks towards the timeout start
            if seq is not None and seq.memory_wait_since is None:
                seq.memory_wait_since = now
        return can_run

    def _shortfall(self, scheduler: Scheduler) -> tuple[list[int], list[Sequence]]:
        """Bytes to ask for, most wanted first: the running answers' growth with every
        sequence free slots would take now, then with the head of the queue alone, then
        the growth alone; [] when credit covers it. And the answers due to grow."""
        ledger = self.ledger
        due = [s for s in scheduler.running if s.num_computed >= s.booked_tokens]
        placements = scheduler.next_placements()
        with self._lock:
            grow = sum(ledger.need(s.slot, self.target(s, s.num_computed + 1)) for s in due)
            needs = [ledger.need(slot, self.target(seq, len(seq.prompt))) for seq, slot in placements]
            base = ledger.resume_need(self._store.live_tokens) + self._away_bytes() if self._is_paused else 0
            credit = ledger.credit
        base += grow
        if not needs and not base:
            return [], due
        asks = [base + sum(needs) - credit, base + (needs[0] if needs else 0) - credit]
        if grow:
            asks.append(base - credit)
        return [a for a in dict.fromkeys(asks) if a > 0], due

    def _request(self, asks: list[int]) -> bool:
        """Ask the broker for credit; True when granted. Refused, the model first gives
        back its own cached prefixes and asks again; still refused, it asks again only
        after RETRY_S, or sooner once one of its own sequences ended."""
        if time.monotonic() < self._retry_at and self._ended == self._ended_seen:
            return False
        self._ended_seen = self._ended
        if any(self._ask(n) for n in asks):
            return True
        if self.cached_bytes() > 0:
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
            handle.admit(nbytes, commit=self._grant)
        except AdmissionDenied as exc:
            if not self._last_refusal:   # once a wait, not once a retry
                log.info("%s: requests wait for memory: %s", self.name, exc)
            self._last_refusal = str(exc)
            return False
        self._last_refusal = ""
        return True

    def _grant(self, nbytes: int) -> None:
        """The broker's commit callback, under its lock: counted as held at once."""
        with self._lock:
            self.ledger.grant(nbytes)

    def expired(self, scheduler: Scheduler, now: float) -> list[tuple[Sequence, EngineBusy | None]]:
        """Sequences refused memory for longer than the limit: waiting ones with the
        EngineBusy they answer, paused answers with None (they end with "length")."""
        out: list[tuple[Sequence, EngineBusy | None]] = []
        if self.handle is None:
            return out
        for seq in scheduler.waiting:
            if seq.memory_wait_since is not None and now - seq.memory_wait_since > self.timeout_s:
                out.append((seq, self._busy(seq, now)))
        for seq in scheduler.running:
            if seq.memory_wait_since is not None and now - seq.memory_wait_since > self.timeout_s:
                out.append((seq, None))
        return out

    def _busy(self, seq: Sequence, now: float) -> EngineBusy:
        need = self.ledger.booking_pages(self.target(seq, len(seq.prompt))) * self.ledger.page_size
        return EngineBusy(
            f"model {self.name}: this request waited {now - seq.memory_wait_since:.0f} s for "
            f"{need / MiB:.1f} MiB of GPU memory for its KV cache; the memory is held by other "
            "models or applications (or this model's max_bytes is reached). Retry later, "
            "or unload a model.")

    # --- inside the step (step lock held): the scheduler pays from the credit ----------
    def admit(self, seq: Sequence, slot: int) -> bool:
        """The scheduler's gate: seq takes `slot` once its booking is paid."""
        target = self.target(seq, len(seq.prompt))
        with self._lock:
            booked = self.ledger.book(slot, target, enforce=self.handle is not None)
        if booked:
            seq.booked_tokens, seq.memory_wait_since = target, None
        elif seq.memory_wait_since is None:
            seq.memory_wait_since = time.monotonic()
        return booked

    def grow(self, seq: Sequence) -> bool:
        """Before a running answer writes past its booking: the booking grows a chunk,
        or the answer sits this step out, waiting for memory (the module docstring)."""
        target = self.target(seq, seq.num_computed + 1)
        with self._lock:
            grown = self.ledger.extend(seq.slot, target, enforce=self.handle is not None)
        if grown:
            seq.booked_tokens, seq.memory_wait_since = target, None
        elif seq.memory_wait_since is None:
            seq.memory_wait_since = time.monotonic()
            log.info("%s: an answer of %d tokens pauses until memory frees (at most %.0f s)",
                     self.name, seq.num_computed, self.timeout_s)
        return grown

    # --- 2. after a step -----------------------------------------------------------
    def settle(self, scheduler: Scheduler) -> None:
        """The book learns what ran and what ended; unused credit goes back once
        nothing waits for memory."""
        running = [s.slot for s in scheduler.running]
        mapped = self._store.held_bytes
        with self._lock:
            self._ended += self.ledger.settle(mapped, running, self._store.live_tokens)
            if self.ledger.credit and not (scheduler.waiting or self._is_paused or _stalled(scheduler.running)):
                self.ledger.clear_credit()

    # --- the engine's verbs (between steps) ------------------------------------------
    def after_reclaim(self) -> None:
        """After a trim or drop_prefixes: every slot maps exactly its live tokens."""
        with self._lock:
            if not self._is_paused:
                self.ledger.reset(self._store.held_bytes, self._store.live_tokens)

    def after_pause(self) -> None:
        with self._lock:
            self._is_paused = True
            self.ledger.reset(0, None)

    def resume_need(self) -> int:
        with self._lock:
            return self.ledger.resume_need(self._store.live_tokens) + self._away_bytes()

    def after_resume(self, need: int) -> None:
        """The worker asked for `need` before this step; the KV is back."""
        with self._lock:
            self._is_paused = False
            self.ledger.take_credit(need)
            self.ledger.reset(self._store.held_bytes, self._store.live_tokens)

    # --- what the broker and memory reports read (any thread) --------------------------
    def booked_bytes(self, mapped_now: int) -> int:
        with self._lock:
            return self.ledger.booked_bytes(mapped_now)

    def cached_bytes(self) -> int:
        with self._lock:
            return self.ledger.cached_bytes()


def _due(running: list[Sequence]) -> bool:
    """Will a running answer's next token pass its booking?"""
    for seq in running:
        if seq.num_computed >= seq.booked_tokens:
            return True
    return False


def _stalled(running: list[Sequence]) -> bool:
    """Is a running answer sitting steps out for memory?"""
    for seq in running:
        if seq.memory_wait_since is not None:
            return True
    return False
