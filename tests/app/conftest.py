"""A REAL daemon for the tests: `python -m app.daemon` on a free loopback port, on the
bundled default model (SmolLM2 through llama.cpp), with EBBTIDE_HOME in a tmp dir.

`live_server` is one daemon shared by the whole session (loading the model once
keeps the suite fast); `start_daemon(settings_toml=...)` starts a private one for
tests that stop it, unload on a timer or need other settings. Both wait for
/health and stop the daemon with SIGTERM at the end.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import tomli_w

ROOT = Path(__file__).resolve().parents[2]
# Hermetic: no scanning of the machine's Ollama/LM Studio/HF stores, only the bundled model.
# max_queue: the 32-concurrent-streams test queues 31 requests behind one on llama.cpp.
# llama_threads 1: the test machine's 2 cores are shared, and llama.cpp's threads spin at every
# barrier, so two of them on a busy machine decode tens of times slower than one.
BASE_SETTINGS = {"scan_ollama": False, "scan_lmstudio": False, "scan_hf_cache": False,
                 "monitor_interval_s": 0.2, "max_queue": 64, "llama_threads": 1}
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Daemon:
    home: Path
    port: int
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return (self.home / "run" / "control-token").read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120), trust_env=False, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def default_model(self) -> str:
        with self.client() as client:
            return client.get("/api/tags").json()["models"][0]["name"]

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _spawn(home: Path, settings_toml: str = "") -> Daemon:
    (home / "config").mkdir(parents=True, exist_ok=True)
    # A test's settings override the hermetic base (a TOML key may appear only once).
    settings = {**BASE_SETTINGS, **tomllib.loads(settings_toml)}
    (home / "config" / "settings.toml").write_text(tomli_w.dumps(settings))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBBTIDE_")}
    env.update({"EBBTIDE_HOME": str(home), "EBBTIDE_PORT": str(port), "EBBTIDE_BACKEND": "host",
                "PYTHONPATH": str(ROOT), "NO_PROXY": "127.0.0.1,localhost"})
    log_path = home / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.daemon"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    daemon = Daemon(home, port, proc, log_path, env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"daemon exited with {proc.returncode}:\n{daemon.log()[-3000:]}")
        try:
            if httpx.get(f"{daemon.url}/health", timeout=1, trust_env=False).status_code == 200:
                return daemon
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    daemon.stop()
    pytest.fail(f"daemon did not answer /health in {START_TIMEOUT_S:.0f} s:\n{daemon.log()[-3000:]}")


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> Iterator[Daemon]:
    """One real daemon for the session, its default model loaded by the first request."""
    daemon = _spawn(tmp_path_factory.mktemp("ebbtide-live"))
    yield daemon
    daemon.stop()


@pytest.fixture
def start_daemon(tmp_path) -> Iterator[Callable[..., Daemon]]:
    """Start private daemons (settings_toml overrides the hermetic settings); all stop at the end."""
    started: list[Daemon] = []

    def start(settings_toml: str = "", home: Path | None = None) -> Daemon:
        """home: an earlier daemon's home, to start it again (a restart)."""
        daemon = _spawn(home or tmp_path / f"home{len(started)}", settings_toml)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="session")
def spawn_daemon() -> Callable[..., Daemon]:
    """_spawn(home, settings_toml) for module-scoped daemons (tests that share one with odd
    settings or their own models); the module's fixture stops it."""
    return _spawn
