"""What a new user meets first (issue 21): a busy port explained, no warning on every CLI call."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from app.exit_codes import BIND as EXIT_BIND
from desktop_support import ROOT, daemon_env, free_port


def serve(home: Path, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                          env=daemon_env(home, free_port()), cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_port_held_by_another_program_says_how_to_choose_another(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = serve(tmp_path, port)
    assert done.returncode == EXIT_BIND
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert f"(pid {os.getpid()}," in done.stderr                  # the holder, named from /proc
    for way in ("--port", "EBBTIDE_PORT=", "settings.toml"):
        assert way in done.stderr
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr


def test_a_port_held_by_a_running_ebbtide_points_at_it(live_server, tmp_path: Path) -> None:
    done = serve(tmp_path, live_server.port)
    assert done.returncode == EXIT_BIND
    assert "by Ebbtide" in done.stderr and "already running" in done.stderr
    assert live_server.url in done.stderr and "ebbtide status" in done.stderr


def test_cli_calls_are_silent_about_a_missing_runtime_dir(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EBBTIDE_", "XDG_"))}
    env.update({"HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "always"})
    done = subprocess.run([sys.executable, "-m", "app.cli", "config", "--path"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "RuntimeDirWarning" not in done.stderr and "XDG_RUNTIME_DIR" not in done.stderr
    assert str(tmp_path) in done.stdout
