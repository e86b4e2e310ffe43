"""What the serving loop does while a model has nothing to serve: the work a load
leaves for later so that the request which loaded the model need not wait for it.

Two kinds, both only once the model has been quiet for CAPTURE_AFTER_IDLE_S (no
request in, waiting or running):
- one-shot tasks the engine hands over (`when_quiet`): the weights' pinned host
  buffer, made ahead for a pause under pressure (engines/torch/weights_rung.py).
  Pinning 4.7 GB took ~3 s on the H100 and held up the load's CUDA work meanwhile
  (cold_start_8b_h100_1142utc.json: the load's capture took 3.2 s on a restart, 0.15 s on a
  reload that kept the buffer);
- the decode graphs `runner.warm_up` left pending, one at a time under the step lock
  (the first compiled one compiles the model: ~30 s with an empty kernel cache, ~8-10 s
  with it filled, on the H100). Without the quiet period the loop, idle the moment the
  load ended, began that compile before the request that loaded the model reached it,
  and the request waited for it (cold_start_*_h100_114*utc.json: 9.5 of a restart's 13.2 s).

A mixin of ServingLoop (serving.py), which calls `_init_idle_work` before its worker
starts; it reads the loop's `_wake`, `_stop`, `_inbox`, `_jobs`, `idle_since`, `runner`,
`scheduler`, `step_lock`, `stats` and `_let_callers_in`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from engines.torch.serve.graph_capture import compile_turn
from engines.torch.serve.oom import as_temporary, give_back_cached_blocks
from kvcached.errors import TemporaryError

log = logging.getLogger(__name__)

# Longer than the gap between an agent's requests of one burst, short beside a compile.
CAPTURE_AFTER_IDLE_S = 2.0
COMPILE_BUSY_RETRY_S = 1.0   # while another model compiles, how often to look again


class IdleWork:
    def _init_idle_work(self) -> None:
        self.quiet_tasks: list[Callable[[], None]] = []   # when_quiet's, in order
        self.hurried = False   # hurry(): no quiet period from now on
        self.kicked = False    # hurry() since the worker last waited: look at the idle work again

    def when_quiet(self, task: Callable[[], None]) -> None:
        """Run task once, on the worker, when the model is next quiet (before any capture)."""
        with self._wake:
            self.quiet_tasks.append(task)
            self._wake.notify()

    def hurry(self) -> None:
        """Do the idle work without waiting for the quiet period (a warm-up that waits for
        it: nobody else is asking this model for anything)."""
        with self._wake:
            self.hurried = self.kicked = True
            self._wake.notify()

    def _wait_for_work(self) -> bool:
        """Until a request comes (doing the idle work meanwhile); False once stopped."""
        while True:
            while self._quiet_long_enough() and self._one_idle_job():
                self.last_progress = time.monotonic()
            with self._wake:
                # A new quiet task, or hurry(), sends the worker back to the idle work once.
                while not (self._stop or self._inbox or self._jobs or self.quiet_tasks or self.kicked):
                    self._wake.wait()
                self.kicked = False
                if self._stop or self._inbox or self._jobs:
                    return not self._stop

    def _has_idle_work(self) -> bool:
        return bool(self.quiet_tasks or self.runner.pending)

    def _quiet_long_enough(self) -> bool:
        """True once no request has come or run for CAPTURE_AFTER_IDLE_S (waiting out the
        rest of it); False as soon as one comes, or where no idle work is left."""
        with self._wake:
            while not (self._stop or self._inbox or self._jobs) and self._has_idle_work():
                left = CAPTURE_AFTER_IDLE_S - (time.monotonic() - self.idle_since)
                if left <= 0 or self.hurried:
                    return True
                self._wake.wait(left)
            return False

    def _one_idle_job(self) -> bool:
        """One quiet task, else one pending capture; False when neither could run."""
        with self._wake:
            task = self.quiet_tasks.pop(0) if self.quiet_tasks else None
        if task is None:
            return self._capture_idle_safely()
        try:
            task()
        except Exception:  # noqa: BLE001 - idle work is an optimisation: never end the worker
            log.exception("%s: idle work failed", self.stats.name)
        return True

    def _capture_while_idle(self) -> bool:
        """One decode graph the load left pending (runner.warm_up), on a slot that holds
        nothing; False when none is pending or no slot is empty. A request arriving
        meanwhile waits for this one capture (~1 s on the H100), not for all of them."""
        if not self.runner.pending:
            return False
        self._let_callers_in()   # a broker verb already waiting goes first: a capture may compile
        with self.step_lock, compile_turn(self.runner.compiles(self.runner.pending[0][0])) as turn:
            slot = self.scheduler.prefix_cache.empty_slot()   # under the lock: a verb may have changed it
            if slot is None:
                return False
            if turn:
                return self.runner.capture_pending(slot)
        # Another model compiles its step now (graph_capture.compile_turn): again shortly,
        # serving whatever comes meanwhile.
        with self._wake:
            self._wake.wait(COMPILE_BUSY_RETRY_S)
        return True

    def _capture_idle_safely(self) -> bool:
        """_capture_while_idle, where a failure (out of memory while another application
        holds the GPU) leaves the rest to be captured on demand, never ends the worker."""
        try:
            return self._capture_while_idle()
        except Exception as exc:  # noqa: BLE001 - a dead worker hangs every request
            typed = as_temporary(exc, f"model {self.stats.name}")
            # Out of memory under pressure is expected; anything else gets its stack (the H200
            # exhaustion run's "operation not permitted when stream is capturing" had none).
            log.warning("capturing a pending decode graph failed (%s); the rest are captured "
                        "when first needed", typed, exc_info=None if isinstance(typed, TemporaryError) else exc)
            self.runner.pending.clear()
            give_back_cached_blocks()
            return False
