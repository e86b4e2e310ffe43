"""Login items and desktop files that are one file in a known folder (XDG autostart, a
LaunchAgent, the desktop entry and its icon): writing and removing that file, the one
place that does it for every platform and for `ebbtide desktop`."""
from __future__ import annotations

from pathlib import Path


def write_entry(path: Path, content: str | bytes) -> Path:
    """Write text (UTF-8) or bytes (an icon); the folder is made when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def remove_entry(path: Path) -> bool:
    """True when an entry was there and is gone now."""
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
