"""The one place tray menu commands run. It never raises: a menu click must not kill the tray.

Commands are named (the menu's entries carry the names) and looked up in a
table. Each returns a short result for the log; a failure is logged, kept as
`last_error` (the tooltip and heading show it) and reported as False. Model
actions and reclaim go to the daemon only through the control API.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from app.control_client import ControlClient
from app.settings_file import save_setting

log = logging.getLogger(__name__)

# Clipboard helpers, first found wins (Wayland, X11, macOS, Windows).
CLIPBOARD_TOOLS: tuple[tuple[str, ...], ...] = (
    ("wl-copy",), ("xclip", "-selection", "clipboard"), ("xsel", "--clipboard", "--input"), ("pbcopy",), ("clip",),
)


@dataclass
class TrayHooks:
    """What the dispatcher needs from the tray around it, passed in (no globals)."""
    refresh: Callable[[], object]                 # re-read the daemon's state, redraw
    quit: Callable[[], object]                    # stop the icon and the daemon
    auto_yield: Callable[[], bool]                # the state shown now
    tray_command: Callable[[], list[str]]         # what start-at-login runs


def copy_to_clipboard(text: str) -> str:
    """Copy with the platform's clipboard tool; returns the tool's name."""
    for tool in CLIPBOARD_TOOLS:
        if shutil.which(tool[0]):
            subprocess.run(tool, input=text.encode(), check=True, timeout=5)
            return tool[0]
    raise RuntimeError("no clipboard tool found (install wl-clipboard, xclip or xsel)")


class Dispatcher:
    def __init__(self, client: ControlClient, settings_file: Path, login_item: ModuleType, hooks: TrayHooks,
                 open_url: Callable[[str], object] = webbrowser.open,
                 copy: Callable[[str], object] = copy_to_clipboard) -> None:
        self.client = client
        self.settings_file = settings_file
        self.login_item = login_item
        self.hooks = hooks
        self.open_url = open_url
        self.copy = copy
        self.last_error = ""
        self.last_result: object = None
        self._lock = threading.Lock()  # one command at a time: clicks queue rather than interleave
        self.commands: dict[str, Callable[[str], object]] = {
            "pause": lambda name: self.client.model_action(name, "pause"),
            "weights_to_host": lambda name: self.client.model_action(name, "weights_to_host"),
            "resume": lambda name: self.client.model_action(name, "resume"),
            "reclaim": lambda name: self.client.model_action(name, "reclaim"),
            "unload": lambda name: self.client.model_action(name, "unload"),
            "reclaim_all": lambda _: self.client.reclaim_all(),
            "toggle_auto_yield": self._toggle_auto_yield,
            "toggle_start_at_login": self._toggle_start_at_login,
            "copy_url": lambda _: self.copy(self.client.base_url),
            "open_dashboard": lambda _: self.open_url(self.client.dashboard_url()),
            "quit": lambda _: self.hooks.quit(),
        }

    def dispatch(self, command: str, arg: str = "") -> bool:
        """Run one command; True when it worked. Never raises."""
        with self._lock:
            try:
                handler = self.commands[command]
                self.last_result = handler(arg)
                self.last_error = ""
                log.info("tray: %s %s done", command, arg)
                ok = True
            except Exception as exc:  # the dispatcher's promise: a click never raises
                self.last_error = f"{command} failed: {exc}"
                log.warning("tray: %s %s failed: %s", command, arg, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                ok = False
        if command != "quit":
            self._refresh_quietly()
        return ok

    def _refresh_quietly(self) -> None:
        try:
            self.hooks.refresh()
        except Exception:
            log.debug("tray: refresh after a command failed", exc_info=True)

    def _toggle_auto_yield(self, _: str) -> bool:
        enabled = not self.hooks.auto_yield()
        self.client.set_auto_yield(enabled)
        save_setting(self.settings_file, "auto_yield", enabled)  # the choice outlives the daemon
        return enabled

    def _toggle_start_at_login(self, _: str) -> bool:
        if self.login_item.is_enabled():
            self.login_item.disable()
            return False
        self.login_item.enable(self.hooks.tray_command())
        return True
