"""Login items that are one file in a known folder (XDG autostart, LaunchAgent):
writing and removing that file, shared by the platforms that use one."""
from __future__ import annotations

from pathlib import Path


def write_entry(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def remove_entry(path: Path) -> bool:
    """True when an entry was there and is gone now."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
