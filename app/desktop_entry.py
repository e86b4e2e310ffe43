"""`ebbtide desktop install|uninstall`: the Linux menu entry and its icons, per user (XDG).

The entry is the packaged app/assets/linux/ebbtide.desktop with its Exec line set
to how this install starts the tray (the same command the login item uses), written
to $XDG_DATA_HOME/applications/; the icons go to the hicolor theme under
$XDG_DATA_HOME/icons/, where every freedesktop menu looks up `Icon=ebbtide`.
Files are written and removed by app.login_item._file_entry, the one place that
writes such files.
"""
from __future__ import annotations

import os
from pathlib import Path

from app import resources
from app.login_item import APP_ID
from app.login_item._file_entry import remove_entry, write_entry
from app.login_item._linux import quote_exec_arg

# Packaged icon -> hicolor size folder.
ICONS: dict[str, str] = {"ebbtide-64.png": "64x64", "ebbtide-256.png": "256x256"}


def data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def entry_path() -> Path:
    return data_home() / "applications" / f"{APP_ID}.desktop"


def icon_paths() -> dict[str, Path]:
    """Packaged icon name -> where it is installed."""
    return {name: data_home() / "icons" / "hicolor" / size / "apps" / f"{APP_ID}.png"
            for name, size in ICONS.items()}


def content(command: list[str]) -> str:
    """The packaged entry, its Exec line replaced by command (quoted as the spec says)."""
    exec_line = "Exec=" + " ".join(quote_exec_arg(arg) for arg in command)
    lines = resources.read_text("linux", f"{APP_ID}.desktop").splitlines()
    return "\n".join(exec_line if line.startswith("Exec=") else line for line in lines) + "\n"


def install(command: list[str]) -> list[Path]:
    """Write the entry and the icons; returns the paths written."""
    written = [write_entry(entry_path(), content(command))]
    for name, path in icon_paths().items():
        written.append(write_entry(path, resources.read_bytes("icons", name)))
    return written


def uninstall() -> list[Path]:
    """Remove what install wrote; returns the paths that were there."""
    return [path for path in (entry_path(), *icon_paths().values()) if remove_entry(path)]


def is_installed() -> bool:
    return entry_path().is_file()
