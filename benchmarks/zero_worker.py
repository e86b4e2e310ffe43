"""Putting the read-only zero page back behind given-back pages, off the caller's path.

Giving a page back costs cuMemUnmap + cuMemRelease; putting the zero page back
costs another cuMemMap + cuMemSetAccess (~30 us per page on an H100, as much
as the give-back itself: benchmarks/vmm_driver_costs.py). A caller that will
launch no work reading those pages until it calls `settle()` (benchmarks/staged_vmm.py;
kvcached itself does not use it) may leave that work to this thread, so memory
goes back at the raw driver rate. Until a task has run, its page has no
mapping at all: a kernel reading it would fault, hence the settle() rule.

The thread waits for a quiet moment (no kvcached driver call for `quiet_s`)
before each task: driver calls from two threads serialize inside the driver,
and the give-back that queued the work is usually followed by more of it
(releasing the pages). A task not started yet can be cancelled (the page is
mapped again right away) or run by the caller itself (settle()).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, CANCELLED = range(4)
QUIET_S = 0.002  # a burst of map/unmap/release calls is over after this long without one


class ZeroTask:
    """One page range waiting for its zero page."""

    __slots__ = ("addr", "size", "state", "error")

    def __init__(self, addr: int, size: int) -> None:
        self.addr = addr
        self.size = size
        self.state = PENDING
        self.error: BaseException | None = None


class ZeroWorker:
    """A FIFO of zero-page restores run by one daemon thread in quiet moments."""

    def __init__(self, map_zero: Callable[[int, int], None], quiet_s: float = QUIET_S,
                 name: str = "kvcached-zero") -> None:
        self._map_zero = map_zero
        self._quiet_s = quiet_s
        self._last_busy = 0.0
        self._queue: deque[ZeroTask] = deque()
        self._lock = threading.Lock()  # `with` on a Lock is C; on a Condition, Python
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def touch(self) -> None:
        """The caller is making driver calls: hold the queue back a moment (lock-free)."""
        self._last_busy = time.monotonic()

    def submit(self, addr: int, size: int) -> ZeroTask:
        task = ZeroTask(addr, size)
        self.touch()
        with self._lock:
            if self._closed:  # nobody left to run it: do it here
                task.state = RUNNING
            else:
                if not self._queue:  # else the thread is awake or waits on a timeout already
                    self._cond.notify_all()
                self._queue.append(task)
                return task
        self._run(task)
        return task

    def cancel(self, task: ZeroTask) -> bool:
        """True when the task had not started: its range stays without any mapping."""
        with self._lock:
            if task.state != PENDING:
                return False
            task.state = CANCELLED
            return True

    def finish(self, task: ZeroTask) -> None:
        """Make sure the task has run: here and now if it has not started, else wait.
        Re-raises its error."""
        if self.cancel(task):
            task.state = RUNNING
            self._run(task)
        with self._lock:
            while task.state == RUNNING:
                self._cond.wait()
        if task.error is not None:
            raise task.error

    def close(self) -> None:
        """Run what is queued, then stop the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _next_task(self) -> ZeroTask | None:
        """The next task to run once things are quiet; None when closed and drained."""
        with self._lock:
            while True:
                while self._queue and self._queue[0].state != PENDING:  # cancelled or finished
                    self._queue.popleft()
                if not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                idle = time.monotonic() - self._last_busy
                if idle < self._quiet_s and not self._closed:
                    self._cond.wait(self._quiet_s - idle)
                    continue
                task = self._queue.popleft()
                task.state = RUNNING
                return task

    def _loop(self) -> None:
        while (task := self._next_task()) is not None:
            self._run(task)

    def _run(self, task: ZeroTask) -> None:
        try:
            self._map_zero(task.addr, task.size)
        except BaseException as exc:  # surfaced to whoever finishes the task
            log.exception("restoring the zero page at %#x failed", task.addr)
            task.error = exc
        with self._lock:
            task.state = DONE
            self._cond.notify_all()
