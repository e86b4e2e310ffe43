"""The torch engine's step loop: one worker thread that owns the scheduler, the
runner and the KV, and streams each request's chunks to its caller.

Callers (HTTP threads) submit a Job and read its chunks from a queue; the
broker's verbs enter `between_steps()`, so they run between steps (at the next
boundary: the worker waits for them) and never unmap a page a running step touches (the illegal-address crash seen in vLLM and
kvcached). A step is schedule -> run -> sample -> postprocess.

With a MemoryAdmission (engines/torch/serve/admission.py), the worker asks the
broker for the KV its waiting sequences need *before* taking the step lock
(the broker may be reclaiming from another model, whose verbs wait for that
model's step boundary: asking under our lock could deadlock two models), and
the step admits only what that credit covers. Refused with nothing running,
it waits on its condition (ADMISSION_WAIT_S, or a new request), never spins.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from engines.errors import EngineBusy
from engines.torch.serve.admission import MemoryAdmission
from engines.torch.serve.runner import Runner
from engines.torch.serve.sampling import make_generator, sample
from engines.torch.serve.scheduler import Scheduler, Sequence, SeqStatus
from engines.torch.serve.step_stats import StepStats
from engines.torch.serve.stops import StopMatcher
from engines.types import FinishReason, GenerateRequest, StreamChunk, Usage

log = logging.getLogger(__name__)

ADMISSION_WAIT_S = 0.05   # refused memory with nothing running: look again this often


@dataclass(eq=False)
class Job:
    request: GenerateRequest
    seq: Sequence
    decoder: object                      # engines.text.tokenizer.StreamDecoder (feed/flush)
    stop_token_ids: frozenset[int]
    out: queue.Queue = field(default_factory=queue.Queue)
    matcher: StopMatcher = field(init=False)
    generator: torch.Generator | None = None
    started_ns: int = field(default_factory=time.perf_counter_ns)
    first_token_ns: int = 0

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.request.sampling.stop)


class ServingLoop:
    def __init__(self, scheduler: Scheduler, runner: Runner, max_queue: int,
                 before_step: Callable[[], None] = lambda: None, name: str = "torch",
                 memory: MemoryAdmission | None = None) -> None:
        self.scheduler = scheduler
        self.memory = memory
        if memory is not None:
            scheduler.gate = memory.gate
        self.stats = StepStats(name)
        self.runner = runner
        self.max_queue = max_queue
        self.before_step = before_step           # e.g. resume a paused KV
        self.step_lock = threading.RLock()
        # Callers waiting in between_steps(): the worker lets them in before its next step.
        self._callers_waiting = 0
        self._callers = threading.Condition()
        self._inbox: list[Job] = []
        self._jobs: dict[int, Job] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._closing = False
        self.idle_since = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._thread.start()

    # --- callers' side -------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closing:
                raise EngineBusy("the model is unloading; retry to load it again")
            if len(self._inbox) + len(self.scheduler.waiting) >= self.max_queue:
                raise EngineBusy(f"{self.max_queue} requests are already waiting for this model")
            self._inbox.append(job)
            self._wake.notify()

    @property
    def busy(self) -> bool:
        return bool(self._inbox or self._jobs)

    @contextlib.contextmanager
    def between_steps(self) -> Iterator[None]:
        """Hold the model between two steps (the broker's verbs, embeddings), fairly.
        A bare `with step_lock` from another thread could wait many steps: the
        worker releases the lock and takes it again for the next step before the
        waiting thread gets the GIL to wake up; so the worker waits for callers here."""
        with self._callers:
            self._callers_waiting += 1
        try:
            self.step_lock.acquire()
        finally:
            with self._callers:
                self._callers_waiting -= 1
                self._callers.notify_all()
        try:
            yield
        finally:
            self.step_lock.release()

    def _let_callers_in(self) -> None:
        with self._callers:
            while self._callers_waiting:
                self._callers.wait()

    def close(self) -> None:
        """Refuse new requests, let those in flight finish, then stop the worker."""
        with self._wake:
            self._closing = True
            while self._inbox or self._jobs:
                self._wake.wait(0.05)
            self._stop = True
            self._wake.notify()
        self._thread.join()

    # --- the worker ----------------------------------------------------------
    def _run(self) -> None:
        while True:
            if self._is_idle() and self._capture_while_idle():
                continue
            with self._wake:
                while not (self._stop or self._inbox or self._jobs):
                    self._wake.wait()
                if self._stop:
                    break
            self._let_callers_in()
            try:
                if self._needs_memory() and not self._reserve_memory():
                    continue
                self.step()
            except Exception as exc:  # a failed step fails its requests, never the worker
                log.exception("torch engine step failed")
                self._fail_all(exc)
        self._fail_all(EngineBusy("the model was unloaded while this request waited"))

    def _is_idle(self) -> bool:
        with self._wake:
            return not (self._stop or self._inbox or self._jobs)

    def _capture_while_idle(self) -> bool:
        """One decode graph the load left pending (runner.warm_up), on a slot that holds
        nothing; False when none is pending or no slot is empty. A request arriving
        meanwhile waits for this one capture (~1 s on the H100), not for all of them."""
        if not self.runner.pending:
            return False
        slot = self.scheduler.prefix_cache.empty_slot()
        if slot is None:
            return False
        with self.step_lock:
            return self.runner.capture_pending(slot)

    def _needs_memory(self) -> bool:
        """Anything to ask the broker for (a request waits, or the KV must come back)?
        Read without the lock: only this thread adds to the queue's waiting side."""
        memory = self.memory
        return memory is not None and memory.enforced and \
            bool(self._inbox or self.scheduler.waiting or memory.is_paused())

    def _reserve_memory(self) -> bool:
        """Credit from the broker for what waits (no lock held while asking). False:
        refused and nothing can run, after waiting a little (the caller loops)."""
        with self.step_lock:
            self._admit()
            self._reap_cancelled()
            self._expire_memory_waits()
            self.memory.settle(self.scheduler)   # what the reaping ended gives its booking back
            asks = self.memory.shortfall(self.scheduler)
            can_run = bool(self.scheduler.running) and not self.memory.is_paused()
            head = self.scheduler.waiting[0] if self.scheduler.waiting else None
        if not asks or self.memory.request(asks):
            return True
        if head is not None and head.memory_wait_since is None:
            head.memory_wait_since = time.monotonic()   # its clock towards the timeout starts
        if can_run:
            return True
        with self._wake:
            if not (self._stop or self._inbox):
                self._wake.wait(ADMISSION_WAIT_S)
        return False

    def _expire_memory_waits(self) -> None:
        for seq, error in self.memory.expired(self.scheduler, time.monotonic()):
            log.warning("%s", error)
            self.scheduler.finish(seq, FinishReason.CANCELLED)
            job = self._jobs.pop(seq.seq_id, None)
            if job is not None:
                job.out.put(error)
        self._note_idle()

    def step(self) -> None:
        with self.step_lock:
            try:
                self._step()
            finally:
                if self.memory is not None:
                    self.memory.settle(self.scheduler)

    def _step(self) -> None:
        self.before_step()
        self._admit()
        self._reap_cancelled()
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return
        t1 = time.perf_counter()
        logits = self.runner.run(plan)
        seqs = plan.sampling_sequences()
        jobs = [self._jobs[s.seq_id] for s in seqs]
        t2 = time.perf_counter()
        tokens = [] if not seqs else sample(logits, [j.request.sampling for j in jobs], [s.tokens for s in seqs],
                        [j.generator for j in jobs])
        t3 = time.perf_counter()
        for seq in self.scheduler.complete(plan, tokens):
            self._postprocess(self._jobs[seq.seq_id], seq.output[-1])
        self._note_idle()
        self.stats.record(len(plan.decodes), sum(c.end - c.start for c in plan.prefills),
                          {"schedule": t1 - t0, "run": t2 - t1, "sample": t3 - t2,
                           "post": time.perf_counter() - t3})
        self.stats.maybe_log(len(self.scheduler.waiting), len(self.scheduler.running))

    def _admit(self) -> None:
        with self._wake:
            inbox, self._inbox = self._inbox, []
        for job in inbox:
            try:
                self.scheduler.add(job.seq)
            except Exception as exc:  # typed errors (ContextOverflow, EngineBusy) go to the caller
                job.out.put(exc)
                continue
            if job.seq.status is SeqStatus.FINISHED:           # max_tokens 0
                self._send_final(job, FinishReason.LENGTH)
                continue
            job.generator = make_generator(job.request.sampling.seed, self.runner.device) \
                if not job.request.sampling.is_greedy else None
            self._jobs[job.seq.seq_id] = job

    def _reap_cancelled(self) -> None:
        for job in list(self._jobs.values()):
            if job.request.cancelled.is_set():
                self.scheduler.cancel(job.seq)
                self._send_final(job, FinishReason.CANCELLED)

    def _postprocess(self, job: Job, token: int) -> None:
        if job.first_token_ns == 0:
            job.first_token_ns = time.perf_counter_ns()
        if token in job.stop_token_ids:
            self.scheduler.finish(job.seq, FinishReason.STOP)
            self._send_final(job, FinishReason.STOP, drop_last=True)
            return
        text = job.matcher.feed(job.decoder.feed(token))
        if job.matcher.is_stopped:
            self.scheduler.finish(job.seq, FinishReason.STOP)
            self._send_final(job, FinishReason.STOP, text=text)
            return
        if job.seq.status is SeqStatus.FINISHED:               # max_tokens reached
            self._send_final(job, job.seq.finish_reason or FinishReason.LENGTH, text=text, token=token)
            return
        job.out.put(StreamChunk(text=text, token_ids=(token,)))

    def _send_final(self, job: Job, reason: FinishReason, text: str = "", token: int | None = None,
                    drop_last: bool = False) -> None:
        if reason is not FinishReason.STOP or not job.matcher.is_stopped:
            text += job.matcher.feed(job.decoder.flush()) + job.matcher.flush()
        now = time.perf_counter_ns()
        seq = job.seq
        first = job.first_token_ns or now
        usage = Usage(prompt_tokens=len(seq.prompt),
                      completion_tokens=len(seq.output) - (1 if drop_last else 0),
                      cached_tokens=seq.num_cached,
                      prompt_eval_ns=first - job.started_ns, eval_ns=now - first)
        job.out.put(StreamChunk(text=text, token_ids=() if token is None else (token,),
                                finish_reason=reason, usage=usage))
        self._jobs.pop(seq.seq_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        with self._wake:
            pending, self._inbox = self._inbox, []
        for job in pending:
            job.out.put(exc)
        for job in self._jobs.values():
            if job.seq.status is not SeqStatus.FINISHED:
                self.scheduler.finish(job.seq, FinishReason.CANCELLED)
                if job.seq.slot >= 0:  # the failed step may have left its KV half-written
                    self.scheduler.prefix_cache.forget(job.seq.slot)
            job.out.put(exc)
        self._jobs.clear()
        self._note_idle()
        if self.memory is not None:
            with self.step_lock:
                self.memory.settle(self.scheduler)

    def _note_idle(self) -> None:
        if not self._jobs and not self._inbox:
            self.idle_since = time.monotonic()
