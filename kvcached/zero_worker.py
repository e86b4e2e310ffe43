"""Putting the read-only zero page back behind given-back pages, off the caller's path.

Giving a page back costs cuMemUnmap + cuMemRelease; putting the zero page back
costs another cuMemMap + cuMemSetAccess (~30 us per page on an H100, as much
as the give-back itself: benchmarks/vmm_driver_costs.py). A caller that will
launch no work reading those pages until it calls `settle()` (pause, unload,
a trim between engine steps) may leave that work to this thread, so memory
goes back at the raw driver rate. Until a task has run, its page has no
mapping at all: a kernel reading it would fault, hence the settle() rule.
A task not yet started can be cancelled, which is how mapping a page again
right after giving it back costs nothing extra.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, CANCELLED = range(4)


class ZeroTask:
    """One page range waiting for its zero page."""

    __slots__ = ("addr", "size", "state", "error")

    def __init__(self, addr: int, size: int) -> None:
        self.addr = addr
        self.size = size
        self.state = PENDING
        self.error: BaseException | None = None


class ZeroWorker:
    """A FIFO of zero-page restores run by one daemon thread."""

    def __init__(self, map_zero: Callable[[int, int], None], name: str = "kvcached-zero") -> None:
        self._map_zero = map_zero
        self._queue: deque[ZeroTask] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, addr: int, size: int) -> ZeroTask:
        task = ZeroTask(addr, size)
        with self._cond:
            if self._closed:  # nobody left to run it: do it here
                self._run(task)
                return task
            self._queue.append(task)
            self._cond.notify_all()
        return task

    def cancel(self, task: ZeroTask) -> bool:
        """True when the task had not started: its range stays without any mapping."""
        with self._cond:
            if task.state != PENDING:
                return False
            task.state = CANCELLED
            return True

    def wait(self, task: ZeroTask) -> None:
        """Block until the task ran (or was cancelled); re-raise its error."""
        with self._cond:
            while task.state in (PENDING, RUNNING):
                self._cond.wait()
        if task.error is not None:
            raise task.error

    def close(self) -> None:
        """Run what is queued, then stop the thread. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                task = self._queue.popleft()
                if task.state == CANCELLED:
                    continue
                task.state = RUNNING
            self._run(task)

    def _run(self, task: ZeroTask) -> None:
        try:
            self._map_zero(task.addr, task.size)
        except BaseException as exc:  # surfaced to whoever waits on the task
            log.exception("restoring the zero page at %#x failed", task.addr)
            task.error = exc
        with self._cond:
            task.state = DONE
            self._cond.notify_all()
