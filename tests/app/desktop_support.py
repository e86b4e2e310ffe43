"""Shared parts of the desktop tests: an Xvfb display, a tray host on it, a live daemon.

Everything here is real: Debian's Xvfb, the `ebbtide serve` daemon on a free
loopback port with its own EBBTIDE_HOME, and the control API over HTTP.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from app.control_client import ControlClient

ROOT = Path(__file__).resolve().parents[2]
# Screenshots go to a scratch folder so `make test` leaves the checkout clean;
# EBBTIDE_UPDATE_SCREENSHOTS=1 refreshes the ones kept in docs/screenshots/.
SCREENSHOTS = (ROOT / "docs" / "screenshots" if os.environ.get("EBBTIDE_UPDATE_SCREENSHOTS")
               else Path(tempfile.gettempdir()) / "ebbtide-screenshots")
# llama_threads = 1: the test machine's 2 cores are shared, and llama.cpp's threads spin at
# every barrier: two of them on a busy machine decode tens of times slower than one.
HERMETIC_SETTINGS = ("scan_ollama = false\nscan_lmstudio = false\nscan_hf_cache = false\nmonitor_interval_s = 0.2\n"
                     "llama_threads = 1\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_xvfb() -> tuple[subprocess.Popen, str]:
    """Xvfb on a display number it picks itself (-displayfd), so parallel runs never clash."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (Debian package xvfb)")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1024x640x24", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()
    if not number:
        proc.kill()
        pytest.fail("Xvfb did not start")
    return proc, f":{number}"


def stop(proc: subprocess.Popen | None, timeout_s: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def daemon_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    (home / "config").mkdir(parents=True, exist_ok=True)
    settings = home / "config" / "settings.toml"
    if not settings.exists():
        settings.write_text(HERMETIC_SETTINGS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBBTIDE_")}
    env.update({"EBBTIDE_HOME": str(home), "EBBTIDE_PORT": str(port), "EBBTIDE_BACKEND": "host",
                "PYTHONPATH": str(ROOT), "XDG_CONFIG_HOME": str(home / "xdg"), **extra})
    return env


class LiveDaemon:
    """`python -m app.cli serve` on a free port under home; .client talks to its control API."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.env = daemon_env(home, self.port)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.client = ControlClient(self.url, home / "run" / "control-token")

    def start(self, timeout_s: float = 90.0) -> "LiveDaemon":
        log = open(self.home / "daemon.out", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=self.env, cwd=ROOT,
                                     stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is not None or self.client.is_alive(), timeout_s, "daemon start")
        if self.proc.poll() is not None:
            pytest.fail("daemon exited: " + (self.home / "daemon.out").read_text()[-3000:])
        return self

    def load_default_model(self) -> str:
        """One short generation, so a model holds memory that a reclaim can give back."""
        body = {"model": "", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
        models = self.client.models()
        body["model"] = models[0]["name"]
        response = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=120, trust_env=False)
        response.raise_for_status()
        return body["model"]

    def cli(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout_s)

    def stop(self) -> None:
        stop(self.proc)
        self.client.close()


def wait_until(predicate, timeout_s: float, what: str, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
