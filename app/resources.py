"""The files Ebbtide ships inside its package (app/assets/): the dashboard, the icons and
the Linux desktop entry and service unit, read through importlib.resources.

A wheel or pipx install has no checkout around it, so nothing here is found relative
to the repository: `files("app")` is the installed package wherever it lives.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

ASSETS = "assets"


def asset(*parts: str):
    """A Traversable for app/assets/<parts...> (it may not exist)."""
    node = resources.files("app") / ASSETS
    for part in parts:
        node = node / part
    return node


def assets_dir() -> Path:
    """app/assets/ as a folder on disk, for StaticFiles. Ebbtide is installed unzipped
    (setuptools' wheels are), so the Traversable is a real path."""
    return Path(str(asset()))


def read_text(*parts: str) -> str:
    return asset(*parts).read_text(encoding="utf-8")


def read_bytes(*parts: str) -> bytes:
    return asset(*parts).read_bytes()
