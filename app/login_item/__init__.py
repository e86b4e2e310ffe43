"""Start at login, one sibling module per platform, chosen here and nowhere else.

Each platform module offers the same five functions: `content(command)` builds
what would be written (tested on any OS), and `location()`, `enable(command)`,
`disable()`, `is_enabled()` act on the real place: the XDG autostart folder on
Linux, a LaunchAgent on macOS, the HKCU Run key on Windows.
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys
from types import ModuleType

PLATFORMS: dict[str, str] = {"linux": "_linux", "darwin": "_darwin", "win32": "_windows"}
APP_ID = "ebbtide"
LABEL = "io.github.ebbtide.tray"  # the LaunchAgent's label, reverse-DNS as launchd expects


class UnsupportedPlatform(RuntimeError):
    """No login item is known for this operating system."""


def for_platform(platform: str | None = None) -> ModuleType:
    platform = sys.platform if platform is None else platform
    key = next((k for k in PLATFORMS if platform.startswith(k)), None)
    if key is None:
        raise UnsupportedPlatform(f"start at login is not supported on {platform}")
    return importlib.import_module(f"{__name__}.{PLATFORMS[key]}")


def tray_command() -> list[str]:
    """How to start the tray at login: the `ebbtide` script where installed, else this python."""
    script = shutil.which("ebbtide")
    if script:
        return [os.path.abspath(script)]
    return [sys.executable, "-m", "app.cli"]
