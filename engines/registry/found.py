"""What a registry source hands back: a name and a file, before its header is read.

Also the two rules every source shares: which .gguf files are models (not a
vision projector, not the second shard of a split model) and that a file
reached through a symlink must stay inside the store it was found in.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# llama.cpp's split files: name-00002-of-00003.gguf; only the first shard is loaded.
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
# Vision projectors ship beside the model as mmproj-*.gguf; they are not models.
_NOT_MODELS = re.compile(r"(^|[-_.])mmproj([-_.]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Found:
    name: str          # as clients address it
    path: str          # the real file (symlinks resolved)
    source: str        # "bundled", "folder", "ollama", "lmstudio", "hf"
    digest: str = ""   # sha256 hex where the store names it (Ollama blobs, HF blobs)


def is_model_file(path: Path) -> bool:
    """A .gguf that is a model: not a projector, not a later shard of a split model."""
    name = path.name
    if not name.lower().endswith(".gguf") or _NOT_MODELS.search(name):
        return False
    shard = _SHARD.search(name)
    return shard is None or int(shard.group(1)) == 1


def resolve_inside(path: Path, root: Path) -> Path | None:
    """path with symlinks resolved, or None (logged) when it leaves root or is no file.
    Stores like the HF cache link snapshots to blobs in the same tree; a link out of
    the tree is not ours to open."""
    try:
        real = path.resolve(strict=True)
        real_root = root.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling link, loop
        log.debug("skipping %s: cannot resolve", path)
        return None
    if not real.is_relative_to(real_root):
        log.warning("skipping %s: it points outside %s", path, root)
        return None
    return real if real.is_file() else None


def walk_gguf(root: Path, max_depth: int) -> list[Path]:
    """Model .gguf files under root, at most max_depth folders down, sorted; unreadable
    folders are skipped, hidden ones too (.git, .cache of other tools)."""
    found: list[Path] = []
    base_depth = len(root.parts)

    def on_error(exc: OSError) -> None:
        log.debug("cannot read %s: %s", exc.filename, exc)

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        here = Path(dirpath)
        if len(here.parts) - base_depth >= max_depth:
            dirnames.clear()
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(here / f for f in sorted(filenames) if is_model_file(here / f))
    return found
