"""The torch engine's step loop: one worker thread that owns the scheduler, the
runner and the KV, and streams each request's chunks to its caller.

Callers (HTTP threads) submit a Job and read its chunks from a queue; the
broker's verbs enter `between_steps()`, so they run between steps (at the next
boundary: the worker waits for them) and never unmap a page a running step touches (the illegal-address crash seen in vLLM and
kvcached). A loop is intake (new requests in, cancelled and timed-out ones out),
the KV budget's `before_step` (engines/torch/serve/kv_budget.py: it asks the
broker for what the waiting sequences need holding no lock, since the broker
may be reclaiming from another model whose verbs wait for that model's step
boundary), then the step: schedule -> run -> sample -> postprocess, and the
budget's `settle`. Refused with nothing able to run, the worker waits on its
condition (ADMISSION_WAIT_S, or a new request), never spins.
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
from engines.torch.serve.idle_work import IdleWork
from engines.torch.serve.kv_budget import KVBudget
from engines.torch.serve.oom import as_temporary, give_back_cached_blocks
from engines.torch.serve.runner import Runner
from engines.torch.serve.sampling import make_generator, sample
from engines.torch.serve.scheduler import Scheduler, Sequence, SeqStatus, StepPlan
from engines.torch.serve.shaping import shape_logits, token_logprob
from engines.torch.serve.step_stats import StepStats
from engines.torch.serve.stops import StopMatcher
from engines.types import FinishReason, GenerateRequest, StreamChunk, Usage
from kvcached.errors import TemporaryError

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
    guide: object | None = None          # engines/torch/serve/guide.Guide: constrained decoding
    token_text: Callable[[int], str] = str   # one token's text, for logprobs
    logprob: object | None = None        # this step's TokenLogprob, where the request asks

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.request.sampling.stop)


class ServingLoop(IdleWork):
    def __init__(self, scheduler: Scheduler, runner: Runner, budget: KVBudget, max_queue: int,
                 before_step: Callable[[], None] = lambda: None, name: str = "torch",
                 on_memory_error: Callable[[list[int]], None] = lambda slots: None) -> None:
        """on_memory_error(slots): after a step failed for want of memory, the slots its
        failed sequences held; the engine gives back what they mapped."""
        self.scheduler = scheduler
        self.on_memory_error = on_memory_error
        self.budget = budget
        scheduler.gate, scheduler.grow = budget.admit, budget.grow
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
        self.last_progress = time.monotonic()   # the worker's heartbeat (stalled_s)
        self._init_idle_work()
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
    def stalled_s(self) -> float | None:
        """Seconds the worker has had work and shown no progress (None while idle): the
        daemon's watchdog reads it, never waiting on the worker's locks."""
        if not self.busy:
            return None
        return time.monotonic() - self.last_progress

    def _run(self) -> None:
        while self._wait_for_work():
            self.last_progress = time.monotonic()   # woke for new work
            self._let_callers_in()
            try:
                with self.step_lock:
                    self._intake()
                if self.budget.before_step(self.scheduler, self.step_lock):
                    self.step()
                else:
                    self._wait(ADMISSION_WAIT_S)   # refused, nothing can run: never spin
            except Exception as exc:  # a failed step fails its requests, never the worker
                self._step_failed(exc)
        self._fail_all(EngineBusy("the model was unloaded while this request waited"))

    def _step_failed(self, exc: Exception) -> None:
        """Its requests get the error (an out-of-memory as a temporary one: HTTP 503);
        the scheduler forgets their slots, so the next request starts clean."""
        typed = as_temporary(exc, f"model {self.stats.name}: a step")
        if isinstance(typed, TemporaryError):
            log.warning("torch engine step failed, temporarily: %s", typed)
        else:
            log.exception("torch engine step failed")
        slots = self._fail_all(typed)
        if isinstance(typed, TemporaryError):
            # What the failed sequences mapped goes back now: the next request (and the
            # application that took the memory) must find it, not a forgotten slot's pages.
            give_back_cached_blocks()
            try:
                self.on_memory_error(slots)
            except Exception:  # noqa: BLE001 - the requests have their error; log and go on
                log.exception("giving back memory after a failed step failed")

    def _wait(self, seconds: float) -> None:
        with self._wake:
            if not (self._stop or self._inbox):
                self._wake.wait(seconds)

    def step(self) -> None:
        with self.step_lock:
            try:
                self._step()
            finally:
                self.budget.settle(self.scheduler)

    def _step(self) -> None:
        self.before_step()                                  # a paused KV comes back first
        stats = self.stats
        with stats.phase("schedule"):
            plan = self.scheduler.schedule()                # admits what the budget paid for
        if plan.is_empty:
            return
        with stats.phase("run"):
            logits = self.runner.run(plan)
        with stats.phase("sample"):
            tokens = self._sample(plan, logits)
        with stats.phase("post"):
            self._postprocess_step(plan, tokens)
        stats.record(len(plan.decodes), sum(c.end - c.start for c in plan.prefills))
        stats.maybe_log(len(self.scheduler.waiting), len(self.scheduler.running))

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> list[int]:
        """The next token of every sequence that samples this step, in the logits' order."""
        seqs = plan.sampling_sequences()
        if not seqs:
            return []
        jobs = [self._jobs[s.seq_id] for s in seqs]
        logits, logprobs = shape_logits(logits, jobs)
        tokens = sample(logits, [j.request.sampling for j in jobs], [s.history for s in seqs],
                        [j.generator for j in jobs])
        for job, row, token in zip(jobs, logprobs, tokens):
            if row is not None:
                job.logprob = token_logprob(row, token, job.request.top_logprobs, job.token_text)
        return tokens

    def _postprocess_step(self, plan: StepPlan, tokens: list[int]) -> None:
        for seq in self.scheduler.complete(plan, tokens):
            self._postprocess(self._jobs[seq.seq_id], seq.output[-1])
        self._note_idle()

    def _intake(self) -> None:
        """Once a loop, under the step lock: new requests in, cancelled ones and those
        that waited too long for memory out."""
        self._admit()
        ended = self._reap_cancelled() + self._expire_memory_waits()
        if ended:   # their bookings end before the budget weighs what waits
            self.budget.settle(self.scheduler)

    def _expire_memory_waits(self) -> int:
        expired = self.budget.expired(self.scheduler, time.monotonic())
        for seq, error in expired:
            job = self._jobs.get(seq.seq_id)
            if error is None:   # an answer that could not grow: it ends as if its context were full
                self.scheduler.finish(seq, FinishReason.LENGTH)
                if job is not None:
                    self._send_final(job, FinishReason.LENGTH)
                continue
            log.warning("%s", error)
            self.scheduler.finish(seq, FinishReason.CANCELLED)
            self._jobs.pop(seq.seq_id, None)
            if job is not None:
                job.out.put(error)
        if expired:
            self._note_idle()
        return len(expired)

    def _admit(self) -> None:
        with self._wake:
            if not self._inbox:
                return
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

    def _reap_cancelled(self) -> int:
        reaped = [job for job in self._jobs.values() if job.request.cancelled.is_set()]
        for job in reaped:
            self.scheduler.cancel(job.seq)
            self._send_final(job, FinishReason.CANCELLED)
        return len(reaped)

    def _postprocess(self, job: Job, token: int) -> None:
        if job.first_token_ns == 0:
            job.first_token_ns = time.perf_counter_ns()
            limit = job.request.prompt_deadline_s   # llama.vscode's t_max_prompt_ms: too late, answer nothing
            if limit and job.first_token_ns - job.started_ns > limit * 1e9:
                self.scheduler.finish(job.seq, FinishReason.LENGTH)
                self._send_final(job, FinishReason.LENGTH, drop_last=True)
                return
        if job.guide is not None:
            job.guide.accept(token)
        logprobs, job.logprob = ((job.logprob,) if job.logprob is not None else ()), None
        if token in job.stop_token_ids:
            self.scheduler.finish(job.seq, FinishReason.STOP)
            self._send_final(job, FinishReason.STOP, drop_last=True)
            return
        text = job.matcher.feed(job.decoder.feed(token))
        if job.matcher.is_stopped:
            self.scheduler.finish(job.seq, FinishReason.STOP)
            self._send_final(job, FinishReason.STOP, text=text)
            return
        reason = job.seq.finish_reason or FinishReason.LENGTH   # max_tokens reached, where it was
        deadline = job.request.deadline_s
        if job.guide is not None and job.guide.done:   # a complete grammar: the answer is whole
            self.scheduler.finish(job.seq, FinishReason.STOP)
            reason = FinishReason.STOP
        elif deadline and time.perf_counter_ns() - job.started_ns > deadline * 1e9 \
                and job.seq.status is not SeqStatus.FINISHED:   # llama.vscode's t_max_predict_ms
            self.scheduler.finish(job.seq, FinishReason.LENGTH)
        if job.seq.status is SeqStatus.FINISHED:
            self._send_final(job, reason, text=text, token=token, logprobs=logprobs)
            return
        job.out.put(StreamChunk(text=text, token_ids=(token,), logprobs=logprobs))

    def _send_final(self, job: Job, reason: FinishReason, text: str = "", token: int | None = None,
                    drop_last: bool = False, logprobs: tuple = ()) -> None:
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
                                finish_reason=reason, usage=usage, logprobs=logprobs))
        self._jobs.pop(seq.seq_id, None)

    def _fail_all(self, exc: BaseException) -> list[int]:
        """Every waiting and running request gets `exc`; returns the slots forgotten."""
        with self._wake:
            pending, self._inbox = self._inbox, []
        for job in pending:
            job.out.put(exc)
        forgotten = []
        for job in self._jobs.values():
            if job.seq.status is not SeqStatus.FINISHED:
                slot = job.seq.slot
                self.scheduler.finish(job.seq, FinishReason.CANCELLED)
                if slot >= 0:  # the failed step may have left its KV half-written
                    self.scheduler.prefix_cache.forget(slot)
                    forgotten.append(slot)
            job.out.put(exc)
        self._jobs.clear()
        self._note_idle()
        with self.step_lock:
            self.budget.settle(self.scheduler)
        return forgotten

    def _note_idle(self) -> None:
        if not self._jobs and not self._inbox:
            self.idle_since = time.monotonic()
