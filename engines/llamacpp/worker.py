"""The single worker thread of a llama.cpp engine.

llama.cpp's native calls on a context are not safe from two threads, so every
call that touches it (batch steps, embedding, pause, resume, drop, unload)
runs here. Two kinds of work: jobs (embeddings, and the broker's and the
app's verbs), run one at a time in arrival order, and the batcher's steps
(generation, batcher.py), run whenever it has work and no job is waiting. A
pause or an embedding thus slips in between two decode steps instead of
waiting for every answer to end. Embedding requests beyond `max_queue`
waiting answer EngineBusy at once; control jobs are never refused.
busy/idle_since come from here: busy while a job runs or waits, or the
batcher has requests.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, TypeVar

from engines.errors import EngineBusy, EngineError

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()
_WAKE = object()


class WorkerStopped(EngineError):
    """The engine's worker has shut down; no more jobs run."""


class Stepper(Protocol):
    @property
    def has_work(self) -> bool: ...
    def step(self) -> None: ...


class Worker:
    def __init__(self, name: str, max_queue: int) -> None:
        self.max_queue = max_queue
        self.stepper: Stepper | None = None   # set once, before the first wake()
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._num_waiting_requests = 0
        self._num_pending = 0           # every job queued or running
        self._stepping = False
        self._idle_since = time.monotonic()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"llamacpp:{name}", daemon=True)
        self._thread.start()

    # --- submitting -----------------------------------------------------------
    def submit(self, fn: Callable[[], T], *, is_request: bool) -> Future[T]:
        """Queue fn. A request (an embedding) counts against max_queue and raises
        EngineBusy when it is full; control jobs always queue."""
        future: Future[T] = Future()
        with self._lock:
            if self._stopped:
                raise WorkerStopped("this model's worker has stopped")
            if is_request:
                if self._num_waiting_requests >= self.max_queue:
                    raise EngineBusy(f"{self._num_waiting_requests} requests are already waiting "
                                     f"for this model (max_queue={self.max_queue}); retry later")
                self._num_waiting_requests += 1
            self._num_pending += 1
        self._jobs.put((fn, future, is_request))
        return future

    def call(self, fn: Callable[[], T]) -> T:
        """Run a control job on the worker and wait for its result (or its exception)."""
        if threading.current_thread() is self._thread:
            return fn()   # already on the worker: queueing would wait on ourselves
        return self.submit(fn, is_request=False).result()

    def wake(self) -> None:
        """The stepper has new work: run steps again."""
        with self._lock:
            if self._stopped:
                raise WorkerStopped("this model's worker has stopped")
        self._jobs.put(_WAKE)

    @property
    def is_worker_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # --- state ------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        with self._lock:
            pending = self._num_pending > 0 or self._stepping
        return pending or (self.stepper is not None and self.stepper.has_work)

    @property
    def idle_since(self) -> float:
        return time.monotonic() if self.busy else self._idle_since

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return self._num_waiting_requests

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued jobs, then end the thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._jobs.put(_STOP)
        if not self.is_worker_thread:
            self._thread.join(timeout)

    # --- the thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            stepping = self.stepper is not None and self.stepper.has_work
            try:
                item = self._jobs.get(block=not stepping)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is None:
                self._step()
            elif item is not _WAKE:
                self._run_job(*item)
            if not self.busy:
                self._idle_since = time.monotonic()

    def _step(self) -> None:
        with self._lock:
            self._stepping = True
        try:
            self.stepper.step()
        except BaseException as exc:  # a bug in a step must not kill the thread every request needs
            log.exception("a batch step failed")
            fail = getattr(self.stepper, "fail_everything", None)
            if fail is not None:   # and must not spin: the requests it held end with the error
                fail(EngineError(f"the batch step failed: {exc}"))
        finally:
            with self._lock:
                self._stepping = False

    def _run_job(self, fn: Callable[[], object], future: Future, is_request: bool) -> None:
        if is_request:
            with self._lock:
                self._num_waiting_requests -= 1
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, never kills the thread
                future.set_exception(exc)
        with self._lock:
            self._num_pending -= 1
