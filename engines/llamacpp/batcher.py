"""Continuous batching on one llama.cpp context: many requests at once, one decode a step.

Requests wait in a bounded queue (max_queue; more answer EngineBusy, as
Ollama's ErrMaxQueue) until a slot is free, then join the running batch at the
next step: no request waits for another's whole answer before its prompt
starts. Each step builds one llama_batch with one token of every sequence that
is generating (each under its own seq id) and fills the rest, up to n_batch,
with a chunk of the prompts being read, in arrival order; one llama_decode
computes them all, and each sequence samples from its own row of logits with
its own sampler. Decoding tokens go first, so a long prompt arriving slows the
running answers by one chunk a step instead of stopping them.

The KV cache is one pool of n_ctx cells. A prompt is admitted when it fits
beside the running sequences (idle slots' cached prefixes are forgotten,
least recently used first, to make room). When the running sequences outgrow
the pool, the newest is preempted: it leaves its slot and waits at the head of
the queue, and on readmission re-reads what it held (its sampler and the text
it streamed are kept, so its answer goes on unchanged).
Worker thread only, except submit() and the counters, which are thread-safe.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from engines.errors import EngineBusy, EngineError
from engines.llamacpp.generation import Sequence
from engines.llamacpp.session import KvFull, Session
from engines.types import FinishReason

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, name: str, max_queue: int, session: Callable[[], Session],
                 take_load_ns: Callable[[], int], wake: Callable[[], None]) -> None:
        self.name = name
        self.max_queue = max_queue
        self._session = session           # the engine's context, resumed or remade on demand
        self._take_load_ns = take_load_ns
        self._wake = wake
        self._lock = threading.Lock()
        self._queue: deque[Sequence] = deque()
        self._active: list[Sequence] = []   # admission order
        self._session_seen: Session | None = None

    # --- any thread -----------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise EngineBusy(f"{len(self._queue)} requests are already waiting for this model "
                                 f"(max_queue={self.max_queue}); retry later")
            self._queue.append(seq)
        self._wake()

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def num_running(self) -> int:
        return len(self._active)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._queue or self._active)

    @property
    def busy_slots(self) -> set[int]:
        return {seq.slot.seq_id for seq in self._active if seq.slot is not None}

    # --- the worker thread --------------------------------------------------------------
    def step(self) -> None:
        """Admit what fits, decode one batch, sample every sequence that has logits."""
        self._drop_cancelled()
        with self._lock:
            if not self._queue and not self._active:
                return
        session = self._session()
        if session is not self._session_seen:
            self._check_restored(session)
        self._admit(session)
        if not self._active:
            return
        self._make_room(session)
        plan = self._fill(session)
        try:
            session.decode()
        except KvFull:
            self._undo(plan)
            self._preempt(session)
            return
        except Exception as exc:  # noqa: BLE001 - a native failure ends the requests in this batch, not the worker
            self._fail_all(session, EngineError(f"{self.name}: llama.cpp failed: {exc}"))
            return
        for seq, index, _ in plan:
            if index is not None and not seq.sample(session, index):
                self._retire(session, seq)

    def fail_everything(self, exc: BaseException) -> None:
        """The model is going away: every request still here ends with exc."""
        with self._lock:
            waiting, self._queue = list(self._queue), deque()
        for seq in self._active + waiting:
            seq.fail(exc)
        self._active = []

    # --- steps ------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        """Cancelled requests end; so do those whose prompt deadline passed while waiting or
        reading it (llama.vscode's t_max_prompt_ms: too late to be useful, nothing answered)."""
        def reason(seq: Sequence) -> FinishReason | None:
            return FinishReason.CANCELLED if seq.cancelled else FinishReason.LENGTH if seq.prompt_overdue else None
        with self._lock:
            ended = [(s, reason(s)) for s in self._queue if reason(s) is not None]
            for seq, _ in ended:
                self._queue.remove(seq)
        for seq, why in ended:
            seq.finish(why)
        for seq in list(self._active):
            why = reason(seq)
            if why is not None:
                seq.finish(why)
                self._retire(self._session_seen, seq)

    def _check_restored(self, session: Session) -> None:
        """A new context (resumed or remade): a running sequence whose KV did not come
        back re-reads it."""
        self._session_seen = session
        for seq in self._active:
            slot = session.slots[seq.slot.seq_id]
            seq.slot = slot
            slot.busy = True
            if slot.tokens != seq.history:
                session.forget(slot)
                seq.admit(slot, 0, 0)

    def _admit(self, session: Session) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                seq = self._queue[0]
                needed = len(seq.to_eval) + len(seq.history) if seq.started else len(seq.prompt)
                if self._active and not self._fits(session, needed):
                    return
                prepared = session.prepare(seq.history + seq.to_eval if seq.started else seq.prompt)
                if prepared is None:
                    return
                self._queue.popleft()
            slot, cached = prepared
            seq.admit(slot, cached, self._take_load_ns())
            self._active.append(seq)

    def _fits(self, session: Session, needed: int) -> bool:
        """Room for `needed` more cells beside one more token of every running sequence,
        forgetting idle caches if that makes it."""
        while session.free_cells < needed + len(self._active):
            if not session.evict_idle():
                return False
        return True

    def _make_room(self, session: Session) -> None:
        """Every running sequence needs a cell this step: forget idle caches, then preempt
        the newest until they fit. One alone always fits (its prompt is under n_ctx, and
        it ends with "length" when its context is full)."""
        while session.free_cells < len(self._active):
            if not session.evict_idle():
                if len(self._active) <= 1:
                    return
                self._preempt(session)

    def _fill(self, session: Session) -> list[tuple[Sequence, int | None, int]]:
        """Generating sequences first (one token each), then prompt chunks while room lasts."""
        plan = []
        order = sorted(self._active, key=lambda s: len(s.to_eval) > 1)   # stable: arrival order kept
        for seq in order:
            queued = session.n_batch - session.batch_room
            room = min(session.batch_room, session.free_cells - queued)
            if room <= 0:
                break
            count = min(room, len(seq.to_eval))
            plan.append((seq, seq.queue_tokens(session, room), count))
        return plan

    def _undo(self, plan: list[tuple[Sequence, int | None, int]]) -> None:
        for seq, _, count in plan:
            seq.unqueue(count)

    def _preempt(self, session: Session) -> None:
        """Send the newest running sequence back to the head of the queue, its cells freed."""
        session.discard_batch()
        if len(self._active) <= 1:
            seq = self._active[0] if self._active else None
            if seq is not None:   # alone and still no room: the context itself is full
                seq.finish(FinishReason.LENGTH)
                self._retire(session, seq)
            return
        seq = self._active.pop()
        log.info("%s: the KV cache is full; a request waits for room and will re-read %d tokens",
                 self.name, len(seq.history))
        session.forget(seq.slot)
        session.release(seq.slot)
        seq.preempt()
        with self._lock:
            self._queue.appendleft(seq)

    def _retire(self, session: Session | None, seq: Sequence) -> None:
        if seq in self._active:
            self._active.remove(seq)
        if session is not None and seq.slot is not None and seq.slot in session.slots:
            session.release(seq.slot)
        seq.slot = None

    def _fail_all(self, session: Session, exc: BaseException) -> None:
        session.discard_batch()
        for seq in list(self._active):
            seq.fail(exc)
            self._retire(session, seq)
        session.clear()   # after a failed decode the cache's contents are unknown
