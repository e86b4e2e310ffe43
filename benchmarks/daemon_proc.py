"""The real daemon as a subprocess, for benchmarks: start, wait until it answers, stop.

Benchmarks measure what a user gets, so they drive `python -m app.cli serve`
over HTTP, never the engines in-process. Each daemon gets its own temporary
EBBTIDE_HOME (settings.toml written there, its own control token, lock and
logs), a free loopback port, and its output in a log file whose tail is shown
when it fails to start. The control API is reached with app.control_client,
the same client the tray and CLI use; broker events are followed in a thread
so a benchmark can report every reclaim step the daemon took.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import tomli_w

from app import env
from app.control_client import ControlClient, ControlError, DaemonNotRunning
from app.paths import AppPaths

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


class DaemonFailed(RuntimeError):
    """The daemon exited or never answered /health; the message carries its log's tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def paths_under(home: Path) -> AppPaths:
    """The paths the daemon uses under EBBTIDE_HOME (the layout app.paths.app_paths gives it)."""
    saved = os.environ.get(env.HOME)
    os.environ[env.HOME] = str(home)
    try:
        from app.paths import app_paths
        return app_paths()
    finally:
        if saved is None:
            os.environ.pop(env.HOME, None)
        else:
            os.environ[env.HOME] = saved


class Daemon:
    """One `python -m app.cli serve` with its own home. Use as a context manager."""

    def __init__(self, settings: dict, name: str = "daemon", extra_env: dict[str, str] | None = None,
                 keep_home: bool = False, home: Path | None = None) -> None:
        """home: run in this EBBTIDE_HOME and keep it (a restart that must find its caches)."""
        self.port = int(settings.get("port") or free_port())
        self.settings = {**settings, "host": "127.0.0.1", "port": self.port}
        self.name = name
        self.extra_env = extra_env or {}
        self._tmp = tempfile.TemporaryDirectory(prefix=f"ebbtide-{name}-") if not (keep_home or home) else None
        self.home = home or (Path(self._tmp.name) if self._tmp else Path(tempfile.mkdtemp(prefix=f"ebbtide-{name}-")))
        self.paths = paths_under(self.home)
        self.log_file = self.home / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.control: ControlClient | None = None
        self.events: list[dict] = []
        self._events_stop = threading.Event()
        self._events_thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle ---------------------------------------------------------------
    def start(self, timeout_s: float = START_TIMEOUT_S) -> "Daemon":
        self.paths.ensure()
        self.paths.settings_file.write_text(tomli_w.dumps(self.settings))
        environ = {**os.environ, env.HOME: str(self.home), **self.extra_env}
        # The child runs from the repo root; keep PYTHONPATH entries meaningful there.
        entries = [str(REPO)] + [str(Path(p).resolve()) for p in
                                 environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(entries))
        for var in (env.CONFIG, env.PORT, env.HOST):  # the settings file must be what counts
            environ.pop(var, None)
        handle = self.log_file.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=REPO,
                                     env=environ, stdout=handle, stderr=subprocess.STDOUT)
        handle.close()
        log.info("%s: started pid %d on port %d (home %s)", self.name, self.proc.pid, self.port,
                 self.home)
        self._wait_healthy(timeout_s)
        self.control = ControlClient(self.base_url, self.paths.token_file, timeout_s=30.0)
        return self

    def wait_for_device(self, timeout_s: float = 120.0) -> float:
        """Wait until the daemon has opened its device (the memory broker answers in
        /control/memory; on the GPU the CUDA libraries and kernel code are loaded by
        then: engines.factory.prepare_device); returns the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if (self.control_get("/control/memory") or {}).get("broker"):
                return time.monotonic() - started
            time.sleep(0.2)
        raise DaemonFailed(f"{self.name}: the memory broker did not open in {timeout_s:.0f} s:\n{self.log_tail()}")

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise DaemonFailed(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise DaemonFailed(f"{self.name} did not answer /health in {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; returns the exit status."""
        self.stop_events()
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("%s did not exit on SIGTERM in %.0f s: killing it", self.name, STOP_TIMEOUT_S)
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        log.info("%s: exited with %s", self.name, code)
        return code

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.keep_log()
        if self._tmp is not None:
            self._tmp.cleanup()

    def keep_log(self, max_lines: int = 3000) -> Path | None:
        """On the lent GPU ($OUT set), keep the daemon's log (its last max_lines) beside the
        results, since the temporary home goes away with the daemon."""
        out = os.environ.get("OUT")
        if not out:
            return None
        dest = Path(out) / f"{self.name}.log"
        dest.write_text(self.log_tail(max_lines) + "\n")
        return dest

    def log_tail(self, num_lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return "(no log)"

    # --- the control API -----------------------------------------------------------
    def control_get(self, path: str) -> dict | list | None:
        """GET a control route; None (logged) when the daemon has no such route yet."""
        assert self.control is not None, "start() the daemon first"
        try:
            return self.control.request("GET", path)
        except (ControlError, DaemonNotRunning) as exc:
            log.warning("%s: GET %s failed: %s", self.name, path, exc)
            return None

    def follow_events(self) -> None:
        """Collect /control/events in a thread (broker reclaim steps, model states)."""
        assert self.control is not None, "start() the daemon first"
        client = ControlClient(self.base_url, self.paths.token_file)

        def pump() -> None:
            with contextlib.closing(client):
                try:
                    for event in client.events(self._events_stop):
                        event.setdefault("received", time.time())
                        self.events.append(event)
                except (ControlError, DaemonNotRunning, httpx.HTTPError) as exc:
                    if not self._events_stop.is_set():
                        log.warning("%s: event stream ended: %s", self.name, exc)

        self._events_thread = threading.Thread(target=pump, name=f"{self.name}-events", daemon=True)
        self._events_thread.start()

    def stop_events(self) -> None:
        self._events_stop.set()
        # The stream thread wakes on the next event or when the daemon closes it; it is a
        # daemon thread, so it never holds the benchmark open.


@contextlib.contextmanager
def running(settings: dict, name: str = "daemon", **kwargs: object) -> Iterator[Daemon]:
    with Daemon(settings, name, **kwargs) as daemon:
        yield daemon
