"""Models in LM Studio's folder: <root>/<publisher>/<repo>/<file>.gguf.

LM Studio keeps downloads in ~/.lmstudio/models (older versions:
~/.cache/lm-studio/models). A model is named "publisher/repo/file.gguf", the
path LM Studio itself shows, so two quantizations of one repo stay apart.
Read-only; symlinks may not leave the folder.
"""
from __future__ import annotations

from pathlib import Path

from engines.registry.found import Found, is_model_file, resolve_inside


def scan_lmstudio(root: Path) -> list[Found]:
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob("*/*/*.gguf")):
        if not is_model_file(path) or any(p.startswith(".") for p in path.relative_to(root).parts):
            continue
        real = resolve_inside(path, root)
        if real is not None:
            found.append(Found(name=path.relative_to(root).as_posix(), path=str(real), source="lmstudio"))
    return found


def scan_lmstudio_roots(roots: list[Path]) -> list[Found]:
    found: list[Found] = []
    for root in roots:
        found.extend(scan_lmstudio(root))
    return found
