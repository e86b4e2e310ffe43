"""Start at login on Linux: an XDG autostart entry, $XDG_CONFIG_HOME/autostart/ebbtide.desktop.

Every freedesktop session (GNOME, KDE, Xfce, LXQt...) starts the entries in
that folder; removing the file is all that disabling needs.
"""
from __future__ import annotations

import os
from pathlib import Path

from app.login_item import APP_ID

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
    path = location()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content(command), encoding="utf-8")
    return path


def disable() -> bool:
    """True when an entry was there and is gone now."""
    try:
        location().unlink()
        return True
    except FileNotFoundError:
        return False


def is_enabled() -> bool:
    return location().is_file()
