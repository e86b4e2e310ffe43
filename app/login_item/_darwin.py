"""Start at login on macOS: a LaunchAgent plist in ~/Library/LaunchAgents.

launchd reads the folder at login; RunAtLoad starts the tray then, and
KeepAlive stays off so Quit in the menu means quit.
"""
from __future__ import annotations

import plistlib
from pathlib import Path

from app.login_item import LABEL


def location() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def content(command: list[str]) -> str:
    return plistlib.dumps({
        "Label": LABEL,
        "ProgramArguments": list(command),
        "RunAtLoad": True,
        "KeepAlive": False,
        "ProcessType": "Interactive",  # a tray app the user sees: not throttled as background
    }).decode("utf-8")


def enable(command: list[str]) -> Path:
    path = location()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content(command), encoding="utf-8")
    return path


def disable() -> bool:
    try:
        location().unlink()
        return True
    except FileNotFoundError:
        return False


def is_enabled() -> bool:
    return location().is_file()
