"""Models in plain folders: Ebbtide's own models folder and the folders named in settings.

A model is named by its path below the folder without ".gguf"
("qwen2.5-coder-1.5b-q4_k_m", "team/llama-3.2-1b"), so dropping a file into the
folder is all it takes. Symlinked files are followed, since the user put them
there; the folders are never written.
"""
from __future__ import annotations

from pathlib import Path

from engines.registry.found import Found, walk_gguf


def scan_folder(root: Path, max_depth: int) -> list[Found]:
    if not root.is_dir():
        return []
    found = []
    for path in walk_gguf(root, max_depth):
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling link or loop
            continue
        if real.is_file():
            name = path.relative_to(root).as_posix()[: -len(".gguf")]
            found.append(Found(name=name, path=str(real), source="folder"))
    return found


def scan_folders(roots: list[Path], max_depth: int) -> list[Found]:
    found: list[Found] = []
    for root in roots:
        found.extend(scan_folder(root, max_depth))
    return found
