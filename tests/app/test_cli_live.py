"""The `ebbtide` client commands against a live daemon, and a daemon started on a broken settings file."""
from __future__ import annotations

from pathlib import Path

import pytest

from app import exit_codes
from app.human import format_bytes
from desktop_support import LiveDaemon

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def daemon(tmp_path: Path):
    live = LiveDaemon(tmp_path / "home").start()
    yield live
    live.stop()


def test_client_commands(daemon: LiveDaemon) -> None:
    model = daemon.load_default_model()
    ps = daemon.cli("ps")
    assert ps.returncode == 0 and model in ps.stdout
    assert "loaded" in ps.stdout and "MiB" in ps.stdout
    weights = {m["name"]: m for m in daemon.client.models()}[model]["memory"]["weights"]
    assert "WEIGHTS" in ps.stdout and format_bytes(weights) in ps.stdout   # of MEMORY, the weights
    models = daemon.cli("models")
    assert models.returncode == 0 and model in models.stdout
    status = daemon.cli("status")
    assert status.returncode == 0 and daemon.url in status.stdout and "auto-yield is on" in status.stdout
    pause = daemon.cli("pause", model)
    assert pause.returncode == 0 and "pause done" in pause.stdout
    assert {m["name"]: m for m in daemon.client.models()}[model]["state"] == "paused"
    assert daemon.cli("resume", model).returncode == 0
    # `pause --weights`: llama.cpp has no weights rung, so the model is paused as it can be.
    away = daemon.cli("pause", "--weights", model)
    assert away.returncode == 0 and "weights to host done" in away.stdout
    assert {m["name"]: m for m in daemon.client.models()}[model]["rung"] == "kv_on_host"
    assert daemon.cli("resume", model).returncode == 0
    reclaim = daemon.cli("reclaim", model)
    assert reclaim.returncode == 0 and "Gave back" in reclaim.stdout
    assert daemon.cli("unload", model).returncode == 0
    assert "No model is in memory" in daemon.cli("ps").stdout
    dashboard = daemon.cli("dashboard")
    assert dashboard.returncode == 0 and dashboard.stdout.startswith(f"{daemon.url}/dashboard?token=")


def test_unknown_model_exits_5(daemon: LiveDaemon) -> None:
    result = daemon.cli("pause", "no-such-model")
    assert result.returncode == exit_codes.NOT_FOUND
    assert "no-such-model" in result.stderr


def test_second_daemon_is_refused(daemon: LiveDaemon) -> None:
    result = daemon.cli("serve")
    assert result.returncode == exit_codes.ALREADY_RUNNING
    assert f"pid {daemon.proc.pid}" in result.stderr and daemon.url in result.stderr


@pytest.mark.parametrize("content,named", [
    ('headroom = "lots"\nscan_ollama = false\nscan_lmstudio = false\nscan_hf_cache = false\n', "headroom"),
    ("port = = 3\n\x00 not toml [[", "(whole file)"),
])
def test_daemon_starts_on_a_broken_settings_file(tmp_path: Path, content: str, named: str) -> None:
    home = tmp_path / "home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "settings.toml").write_text(content)
    live = LiveDaemon(home).start()
    try:
        assert live.client.status()["pid"] == live.proc.pid
        log = (home / "daemon.out").read_text()
        assert named in log and "settings.toml" in log
    finally:
        live.stop()
