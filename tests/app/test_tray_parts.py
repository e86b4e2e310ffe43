"""The tray's parts without a display: view, icon drawing, menu entries, dispatcher, supervisor."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from app.control_client import ControlClient
from app.login_item import for_platform
from app.settings_file import load_settings
from app.tray.dispatcher import Dispatcher, TrayHooks
from app.tray.icon import LOOKS, draw_icon
from app.tray.menu import AUTO_YIELD, FREE_KEEP_READY, GIVE_BACK_ALL, QUIT, START_AT_LOGIN, build_entries, find
from app.tray.supervisor import DaemonState, DaemonSupervisor
from app.tray.view import TrayMode, down_view, view_from
from desktop_support import free_port, start_xvfb, stop, wait_until

MiB = 1 << 20
# Bodies as the daemon's control API answers them (app/server/control_routes.py).
MODELS = [
    {"name": "small", "state": "loaded", "busy": False, "engine": "llamacpp",
     "memory": {"weights": 90 * MiB, "kv_held": 10 * MiB, "kv_live": 0, "paused_host": 0, "total": 100 * MiB}},
    {"name": "coder", "state": "paused", "busy": False, "engine": "torch",
     "memory": {"weights": 200 * MiB, "kv_held": 0, "kv_live": 0, "paused_host": 30 * MiB, "total": 200 * MiB}},
    {"name": "big", "state": "unloaded", "busy": False, "engine": None, "memory": None},
]
MEMORY = {"device": {"total_bytes": 1000 * MiB, "free_bytes": 400 * MiB, "ours_bytes": 300 * MiB,
                     "others_bytes": 300 * MiB}, "auto_yield": True}


def test_view_from_control_api_bodies() -> None:
    view = view_from(MODELS, MEMORY, now=100.0)
    assert view.mode is TrayMode.NORMAL and view.held_bytes == 300 * MiB
    assert view.held_fraction == pytest.approx(0.3) and view.others_fraction == pytest.approx(0.3)
    assert [r.shown_state for r in view.models] == ["idle", "paused", "unloaded"]
    assert "300.0 MiB" in view.tooltip() and "small: idle, 100.0 MiB (weights 90.0 MiB)" in view.tooltip()
    assert view_from(MODELS, MEMORY, last_reclaim_at=99.0, now=100.0).mode is TrayMode.YIELDING
    assert view_from(MODELS[1:], MEMORY, now=100.0).mode is TrayMode.PAUSED


def test_each_mode_looks_different_and_water_rises() -> None:
    view = view_from(MODELS, MEMORY)
    pictures = {mode: draw_icon(dataclasses.replace(view, mode=mode)).tobytes() for mode in TrayMode}
    assert len(set(pictures.values())) == len(TrayMode)

    def water_pixels(fraction: float) -> int:
        held = int(fraction * 1000) * MiB
        models = [{"name": "m", "state": "loaded", "memory": {"weights": held, "kv_held": 0}}]
        data = draw_icon(view_from(models, {"device": {"total_bytes": 1000 * MiB}}), 64).convert("RGBA").tobytes()
        water = LOOKS[TrayMode.NORMAL].water[:3]
        pixels = (data[i:i + 3] for i in range(0, len(data), 4))
        return sum(1 for p in pixels if all(abs(a - b) < 12 for a, b in zip(p, water)))

    levels = [water_pixels(f) for f in (0.0, 0.25, 0.5, 0.9)]
    assert levels[0] == 0 and levels == sorted(levels) and len(set(levels)) == 4
    assert draw_icon(view, 22).size == (22, 22)


def test_menu_entries() -> None:
    entries = build_entries(view_from(MODELS, MEMORY))
    small = find(entries, "small (idle - 100.0 MiB)")
    assert [(c.label, c.command, c.arg) for c in small.children] == [
        ("Pause", "pause", "small"), (FREE_KEEP_READY, "weights_to_host", "small"),
        ("Give back its memory", "reclaim", "small"), ("Unload", "unload", "small")]
    assert find(entries, "coder (paused - 200.0 MiB)").children[0].command == "resume"
    # A model whose weights left the GPU too says so, and cannot be sent there twice.
    off = dict(MODELS[1], rung="weights_on_host", memory=dict(MODELS[1]["memory"], weights=0))
    entry = find(build_entries(view_from([off], MEMORY)), "coder (paused, off the GPU - 0 B)")
    assert entry.children[0].command == "resume"
    assert [c.enabled for c in entry.children if c.command == "weights_to_host"] == [False]
    assert not any(c.enabled for c in find(entries, "big (unloaded)").children)
    assert find(entries, AUTO_YIELD).checked is True and find(entries, START_AT_LOGIN).checked is False
    down = build_entries(down_view(TrayMode.ERROR, "exited with 1"))
    assert "daemon stopped" in down[0].label and not find(down, GIVE_BACK_ALL).enabled
    assert find(down, QUIT).enabled


def test_pystray_menu_is_built_from_entries(monkeypatch) -> None:
    if "pystray" not in sys.modules:  # pystray's import opens the display once, on Linux
        xvfb, display = start_xvfb()
        monkeypatch.setenv("DISPLAY", display)
        try:
            import pystray  # noqa: F401
        finally:
            stop(xvfb)
    pystray = sys.modules["pystray"]
    from app.tray.menu import to_pystray
    calls = []
    items = to_pystray(build_entries(view_from(MODELS, MEMORY)), lambda c, a: calls.append((c, a)))
    menu = pystray.Menu(*items)
    give_back = next(i for i in menu if i.text == GIVE_BACK_ALL)
    give_back(None)
    assert calls == [("reclaim_all", "")]


@pytest.fixture
def dead_client(tmp_path: Path) -> ControlClient:
    return ControlClient(f"http://127.0.0.1:{free_port()}", tmp_path / "token", timeout_s=2)


def test_dispatcher_never_raises_and_toggles_for_real(tmp_path: Path, dead_client, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    quits, copied, refreshed = [], [], []
    hooks = TrayHooks(refresh=lambda: refreshed.append(1), quit=lambda: quits.append(1), auto_yield=lambda: True,
                      tray_command=lambda: ["/usr/bin/ebbtide"])
    item = for_platform("linux")
    dispatcher = Dispatcher(dead_client, tmp_path / "settings.toml", item, hooks, open_url=lambda url: None,
                            copy=copied.append)
    assert dispatcher.dispatch("reclaim_all") is False and "reclaim_all failed" in dispatcher.last_error
    assert dispatcher.dispatch("no-such-command") is False
    assert dispatcher.dispatch("toggle_auto_yield") is False  # the daemon is not there: nothing saved
    assert dispatcher.dispatch("toggle_start_at_login") is True and item.is_enabled()
    assert "Exec=/usr/bin/ebbtide" in item.location().read_text()
    assert dispatcher.dispatch("toggle_start_at_login") is True and not item.is_enabled()
    assert dispatcher.dispatch("copy_url") is True and copied == [dead_client.base_url]
    assert dispatcher.dispatch("quit") is True and quits == [1]
    assert refreshed  # every command but quit refreshes the view


def crashing(code: int) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.exit({code})"]


def test_supervisor_restarts_with_backoff_then_fails() -> None:
    states = []
    sup = DaemonSupervisor(crashing(7), backoff_s=(0.05, 0.1), max_restarts=2,
                           on_change=lambda s: states.append(s.state))
    sup.start()
    assert sup.wait(30)
    assert sup.state is DaemonState.FAILED and sup.last_exit == 7 and sup.restarts == 2
    assert states == [DaemonState.STARTING, DaemonState.RESTARTING, DaemonState.FAILED]


def test_supervisor_stops_a_running_daemon(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    sup = DaemonSupervisor([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                           log_file=log)
    sup.start()
    wait_until(lambda: log.exists() and "up" in log.read_text(), 30, "the child to start")
    sup.mark_running()
    assert sup.state is DaemonState.RUNNING
    assert sup.stop() == -15 and sup.state is DaemonState.STOPPED


def test_loaded_settings_feed_the_dispatcher_path(tmp_path: Path) -> None:
    # The auto-yield toggle writes the key the settings loader reads back.
    from app.settings_file import save_setting
    path = tmp_path / "settings.toml"
    save_setting(path, "auto_yield", False)
    assert load_settings(path, environ={}).settings.auto_yield is False


def test_remote_models_are_marked_in_the_menu() -> None:
    remote = {"name": "lan/qwen-32b", "state": "loaded", "busy": False, "engine": "remote", "source": "remote",
              "remote": "lan", "memory": {"weights": 0, "kv_held": 0, "kv_live": 0, "paused_host": 0, "total": 0}}
    listed = {"name": "lan/llama-70b", "state": "unloaded", "busy": False, "engine": None, "source": "remote",
              "remote": "lan", "memory": None}
    entries = build_entries(view_from([*MODELS, remote, listed], MEMORY))
    assert find(entries, "lan/qwen-32b (idle, on lan)") is not None  # no memory figure: none is held here
    assert find(entries, "lan/llama-70b (unloaded, on lan)") is not None
    assert find(entries, "small (idle - 100.0 MiB)") is not None


def test_tray_and_metrics_read_reclaims_in_the_one_vocabulary() -> None:
    """The tray's "memory given back" and the daemon's /metrics counters read the hub's
    events through app.models.events.event_kind (kvcached's EventKind)."""
    from app.daemon import _count_reclaim
    from app.models.events import EventHub
    from app.server.metrics import Metrics
    from app.tray.app import is_reclaim

    assert is_reclaim({"kind": "broker", "step": "trim", "bytes_returned": 4096})
    assert is_reclaim({"kind": "reclaim", "model": "m", "bytes_returned": 0})   # the user asked: show it
    assert is_reclaim({"kind": "model", "state": "paused", "bytes_returned": 1})
    assert not is_reclaim({"kind": "broker", "step": "admit", "bytes_returned": 0})
    assert not is_reclaim({"kind": "broker", "step": "trim", "bytes_returned": 0})
    assert not is_reclaim({"kind": "model", "state": "loaded"})
    assert not is_reclaim({"kind": "progress", "fraction": 0.5})
    metrics, hub = Metrics(dict), EventHub()
    hub.listen(lambda event: _count_reclaim(metrics, event))
    hub.publish("broker", step="drop_prefixes", client="m", bytes_returned=8192)
    hub.publish("broker", step="auto_yield", client="", bytes_returned=0)
    hub.publish("reclaim", model="m", bytes_returned=4096, reason="manual")
    hub.publish("model", model="m", state="paused", bytes_returned=1, reason="broker")  # announced: counted once
    text = metrics.render()
    assert 'ebbtide_reclaim_events_total{step="drop_prefixes",model="m"} 1' in text
    assert 'ebbtide_reclaim_events_total{step="reclaim",model="m"} 1' in text
    assert "auto_yield" not in text and 'step="pause"' not in text
