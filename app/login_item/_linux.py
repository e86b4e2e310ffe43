"""Start at login on Linux: an XDG autostart entry, $XDG_CONFIG_HOME/autostart/ebbtide.desktop.

Every freedesktop session (GNOME, KDE, Xfce, LXQt...) starts the entries in
that folder; removing the file is all that disabling needs.
"""
from __future__ import annotations

import os
from pathlib import Path

from app.login_item import APP_ID
from app.login_item._file_entry import remove_entry, write_entry

# Desktop Entry spec, "The Exec key": these characters need the argument quoted.
_RESERVED = set(" \t\n\"'\\><~|&;$*?#()`")


def location() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "autostart" / f"{APP_ID}.desktop"


def quote_exec_arg(arg: str) -> str:
    if arg and not (set(arg) & _RESERVED):
        return arg.replace("%", "%%")
    escaped = "".join("\\" + c if c in '"`$\\' else c for c in arg).replace("%", "%%")
    return f'"{escaped}"'


def content(command: list[str]) -> str:
    exec_line = " ".join(quote_exec_arg(arg) for arg in command)
    return "\n".join([
        "[Desktop Entry]",
        "Type=Application",
        "Name=Ebbtide",
        "Comment=Local LLMs that give GPU memory back",
        f"Exec={exec_line}",
        f"Icon={APP_ID}",
        "Terminal=false",
        "Categories=Development;Utility;",
        "X-GNOME-Autostart-enabled=true",
        "",
    ])


def enable(command: list[str]) -> Path:
    return write_entry(location(), content(command))


def disable() -> bool:
    """True when an entry was there and is gone now."""
    return remove_entry(location())


def is_enabled() -> bool:
    return location().is_file()
