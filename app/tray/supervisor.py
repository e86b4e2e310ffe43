"""Keeps the daemon (`ebbtide serve`) running as a child of the tray.

When the child dies unasked, it is started again after a growing pause
(BACKOFF_S); after MAX_RESTARTS quick deaths in a row the supervisor gives up
and reports FAILED, which the icon shows as its error look. A child that stayed
up STABLE_AFTER_S counts as healthy again, so one crash a day never adds up to
giving up. On Linux the child also gets SIGTERM if the tray itself dies
(PR_SET_PDEATHSIG), so no orphan daemon keeps the GPU.
"""
from __future__ import annotations

import ctypes
import enum
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

BACKOFF_S = (1.0, 2.0, 5.0, 10.0)
MAX_RESTARTS = 3
STABLE_AFTER_S = 30.0
PR_SET_PDEATHSIG = 1


class DaemonState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class DaemonSupervisor:
    def __init__(self, command: list[str], env: dict[str, str] | None = None, log_file: Path | None = None,
                 on_change: Callable[["DaemonSupervisor"], object] | None = None,
                 backoff_s: tuple[float, ...] = BACKOFF_S, max_restarts: int = MAX_RESTARTS,
                 stable_after_s: float = STABLE_AFTER_S) -> None:
        self.command = command
        self.env = env
        self.log_file = log_file
        self.on_change = on_change
        self.backoff_s = backoff_s
        self.max_restarts = max_restarts
        self.stable_after_s = stable_after_s
        self.state = DaemonState.STOPPED
        self.restarts = 0          # quick deaths in a row
        self.last_exit: int | None = None
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._spawn(DaemonState.STARTING)
        self._thread = threading.Thread(target=self._watch, name="daemon-supervisor", daemon=True)
        self._thread.start()

    def mark_running(self) -> None:
        """The tray saw the daemon answer: it is up."""
        if self.state in (DaemonState.STARTING, DaemonState.RESTARTING):
            self._set(DaemonState.RUNNING)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Ask the daemon to finish (SIGTERM), kill it if it does not; returns its exit code."""
        self._stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("daemon did not stop in %.0f s; killing it", timeout_s)
                process.kill()
                process.wait()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        self._set(DaemonState.STOPPED)
        return process.returncode if process is not None else None

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the supervisor is done (stopped or failed); True if it is."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # --- inside --------------------------------------------------------------
    def _spawn(self, state: DaemonState) -> None:
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        finally:
            if self.log_file:
                output.close()  # the child has its own copy
        self.started_at = time.monotonic()
        log.info("daemon started (pid %d): %s", self.process.pid, " ".join(self.command))
        self._set(state)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            code = self.process.wait()
            if self._stopping.is_set():
                return
            self.last_exit = code
            if time.monotonic() - self.started_at >= self.stable_after_s:
                self.restarts = 0
            if self.restarts >= self.max_restarts:
                log.error("daemon exited with %s; %d restarts did not help, giving up", code, self.restarts)
                self._set(DaemonState.FAILED)
                return
            pause = self.backoff_s[min(self.restarts, len(self.backoff_s) - 1)]
            self.restarts += 1
            log.warning("daemon exited with %s; restart %d of %d in %.1f s", code, self.restarts,
                        self.max_restarts, pause)
            self._set(DaemonState.RESTARTING)
            if self._stopping.wait(pause):
                return
            self._spawn(DaemonState.RESTARTING)

    def _set(self, state: DaemonState) -> None:
        changed = state is not self.state
        self.state = state
        if changed and self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                log.exception("supervisor listener failed")


def daemon_command() -> list[str]:
    """`ebbtide serve` with this very python, so the child runs the same install as the tray."""
    return [sys.executable, "-m", "app.cli", "serve"]


def daemon_env(supervisor_pid: int) -> dict[str, str]:
    """The tray's environment, plus where `app` is importable from and who holds the lock."""
    from app import env

    root = str(Path(__file__).resolve().parents[2])
    child = dict(os.environ)
    child["PYTHONPATH"] = os.pathsep.join(p for p in (root, child.get("PYTHONPATH", "")) if p)
    child[env.SUPERVISOR] = str(supervisor_pid)
    return child
