"""The single worker thread of a llama.cpp engine, with a bounded request queue.

A llama.cpp context serves one request at a time, and its native calls are not
safe from two threads, so every call that touches the context (generation,
embedding, pause, resume, drop, unload) runs here, one after another.
Requests beyond `max_queue` waiting answer EngineBusy at once (as Ollama's
ErrMaxQueue); control jobs from the broker and the app are never refused.
busy/idle_since come from here: busy while a job runs or waits.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from engines.errors import EngineBusy, EngineError

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()


class WorkerStopped(EngineError):
    """The engine's worker has shut down; no more jobs run."""


class Worker:
    def __init__(self, name: str, max_queue: int) -> None:
        self.max_queue = max_queue
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._num_waiting_requests = 0
        self._num_pending = 0           # every job queued or running
        self._idle_since = time.monotonic()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"llamacpp:{name}", daemon=True)
        self._thread.start()

    # --- submitting -----------------------------------------------------------
    def submit(self, fn: Callable[[], T], *, is_request: bool) -> Future[T]:
        """Queue fn. A request (generation, embedding) counts against max_queue and
        raises EngineBusy when it is full; control jobs always queue."""
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

    @property
    def is_worker_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # --- state ------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        with self._lock:
            return self._num_pending > 0

    @property
    def idle_since(self) -> float:
        with self._lock:
            return time.monotonic() if self._num_pending else self._idle_since

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
            item = self._jobs.get()
            if item is _STOP:
                return
            fn, future, is_request = item
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
                if self._num_pending == 0:
                    self._idle_since = time.monotonic()
