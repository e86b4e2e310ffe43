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


FAKE_PIP = """#!/usr/bin/env bash
# Stands in for "python -m pip wheel -v ... -w DIR": ninja's progress lines, then a wheel.
dir=""; prev=""
for a in "$@"; do [ "$prev" = "-w" ] && dir="$a"; prev="$a"; done
echo "-- Configuring done"
sleep 1.5
for i in 1 2 3; do echo "  [$i/193] /usr/bin/g++ -O3 -c ggml-cpu.c"; sleep 1; done
touch "$dir/llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
"""


def test_the_one_time_build_says_which_step_it_is_on(tmp_path: Path) -> None:
    """The llama-cpp-python build prints its progress every few seconds (issue 21):
    ninja's "[n/N]" steps, which the first version of the script never matched."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PIP)
    fake.chmod(0o755)
    env = {**os.environ, "WHEEL_CACHE": str(tmp_path / "wheels"), "PY": str(fake), "PROGRESS_S": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "llama_wheel.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stdout.splitlines() if "so far" in line]
    assert progress and "configuring" in progress[0]
    assert any("compiling, step [" in line and "/193]" in line for line in progress), done.stdout
    assert "Built llama-cpp-python" in done.stdout
