"""Start at login on macOS: a LaunchAgent plist in ~/Library/LaunchAgents.

launchd reads the folder at login; RunAtLoad starts the tray then, and
KeepAlive stays off so Quit in the menu means quit.
"""
from __future__ import annotations

import plistlib
from pathlib import Path

from app.login_item import LABEL
from app.login_item._file_entry import remove_entry, write_entry


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
    return write_entry(location(), content(command))


def disable() -> bool:
    """True when an entry was there and is gone now."""
    return remove_entry(location())


def is_enabled() -> bool:
    return location().is_file()
