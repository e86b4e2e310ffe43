"""The `ebbtide` command without a daemon: help, usage errors, exit codes, config, one instance."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app import cli, exit_codes
from app.instance_lock import InstanceLock
from app.control_client import ControlClient
from desktop_support import ROOT, daemon_env, free_port, wait_until

COMMANDS = ["serve", "ps", "models", "pause", "resume", "reclaim", "unload", "config", "autostart", "status",
            "dashboard", "tray", "desktop", "pull"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert f"ebbtide {command}" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["frobnicate"], ["pause"], ["autostart", "maybe"], ["serve", "--port", "0"],
                                  ["serve", "--headroom", "lots"]])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == exit_codes.USAGE
    assert "usage: ebbtide" in capsys.readouterr().err


def run(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=daemon_env(home, free_port()), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", [["ps"], ["models"], ["status"], ["reclaim"], ["pause", "m"], ["dashboard"]])
def test_client_commands_without_daemon_exit_3(tmp_path: Path, command: list[str]) -> None:
    result = run(tmp_path, *command)
    assert result.returncode == exit_codes.NOT_RUNNING
    assert "no Ebbtide daemon answers" in result.stderr and "ebbtide serve" in result.stderr


def test_config_prints_path_and_values_and_names_bad_keys(tmp_path: Path) -> None:
    settings = tmp_path / "config" / "settings.toml"
    settings.parent.mkdir(parents=True)
    settings.write_text('headroom = "lots"\nkeep_alive = "10m"\n')
    result = run(tmp_path, "config")
    assert str(settings) in result.stdout
    assert "keep_alive_s = 600.0" in result.stdout
    assert "headroom" in result.stdout and "headroom_bytes = 1073741824" in result.stdout
    assert "headroom" in result.stderr  # logged as well
    assert result.returncode == exit_codes.ERROR  # scripts can tell the file has a problem
    settings.write_text("keep_alive = 5\n")
    assert run(tmp_path, "config").returncode == exit_codes.OK


def test_serve_refuses_a_second_instance(tmp_path: Path) -> None:
    lock = InstanceLock(tmp_path / "run" / "ebbtide.lock")
    lock.acquire("tray", "http://127.0.0.1:1234")
    try:
        result = run(tmp_path, "serve")
    finally:
        lock.release()
    assert result.returncode == exit_codes.ALREADY_RUNNING
    assert "already running" in result.stderr and "http://127.0.0.1:1234" in result.stderr


def test_tray_without_display_runs_headless_and_second_tray_is_refused(tmp_path: Path) -> None:
    env = daemon_env(tmp_path, free_port())
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    tray = subprocess.Popen([sys.executable, "-m", "app.cli"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        said = next(line for line in tray.stdout if "no display" in line)  # log lines come first
        assert "without a tray icon" in said
        client = ControlClient(f"http://127.0.0.1:{env['EBBTIDE_PORT']}", tmp_path / "run" / "control-token")
        wait_until(client.is_alive, 60, "the supervised daemon to answer")
        daemon_pid = client.status()["pid"]
        second = subprocess.run([sys.executable, "-m", "app.cli"], env=env, cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == exit_codes.ALREADY_RUNNING
        assert "already running" in second.stderr and f"pid {tray.pid}" in second.stderr
    finally:
        tray.terminate()
        assert tray.wait(30) == exit_codes.OK
    assert not client.is_alive()  # the daemon went with the tray
    assert not Path(f"/proc/{daemon_pid}").exists() or "zombie" in Path(f"/proc/{daemon_pid}/status").read_text()
