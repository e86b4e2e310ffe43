"""Start at login on Windows: a value under HKCU\\...\\CurrentVersion\\Run.

The value's text is built apart from writing it, so it is tested anywhere;
winreg is imported only when the registry is really touched.
"""
from __future__ import annotations

import subprocess

RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
VALUE_NAME = "Ebbtide"


def location() -> str:
    return f"HKEY_CURRENT_USER\\{RUN_KEY}\\{VALUE_NAME}"


def content(command: list[str]) -> str:
    # list2cmdline quotes as the MS C runtime parses, which is how Windows splits Run values.
    return subprocess.list2cmdline(command)


def _open(access_write: bool):  # pragma: no cover - Windows only
    import winreg

    access = winreg.KEY_SET_VALUE if access_write else winreg.KEY_QUERY_VALUE
    return winreg.OpenKey(winreg.HKEY_CURRENT_USER, RUN_KEY, 0, access)


def enable(command: list[str]) -> str:  # pragma: no cover - Windows only
    import winreg

    with _open(True) as key:
        winreg.SetValueEx(key, VALUE_NAME, 0, winreg.REG_SZ, content(command))
    return location()


def disable() -> bool:  # pragma: no cover - Windows only
    import winreg

    try:
        with _open(True) as key:
            winreg.DeleteValue(key, VALUE_NAME)
        return True
    except FileNotFoundError:
        return False


def is_enabled() -> bool:  # pragma: no cover - Windows only
    import winreg

    try:
        with _open(False) as key:
            winreg.QueryValueEx(key, VALUE_NAME)
        return True
    except FileNotFoundError:
        return False
