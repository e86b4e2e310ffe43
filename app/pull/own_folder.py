"""Ollama's /api/copy and /api/delete, on Ebbtide's own models folder and nowhere else.

A copy is a new name in Ebbtide's folder for a model from any store: a symlink
<models_dir>/<name>.gguf to the model's file (a hard link, then a real copy, where
links are not allowed), so it costs no space and the other store is untouched.
A delete removes only a name in Ebbtide's folder (the link, or a file the user put
there); a model in Ollama's store, LM Studio's folder, the Hugging Face cache or a
folder named in settings answers NotOurs: Ebbtide never deletes another tool's files.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from app.pull.errors import BadModelName, NotOurs

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


def name_path(models_dir: Path, name: str) -> Path:
    """<models_dir>/<name>.gguf for a name made of plain segments (no .., no absolute paths)."""
    segments = name.split("/")
    if not name or len(segments) > 4 or not all(_SEGMENT.match(s) and ".." not in s for s in segments):
        raise BadModelName(f"{name!r} is not a model name Ebbtide can write: use letters, digits and . _ - : "
                           "in up to four /-separated parts")
    if segments[0].lower() in ("hf.co", "huggingface.co"):
        raise BadModelName(f"{name!r}: names under hf.co/ are the Hugging Face cache's, pick another")
    return models_dir.joinpath(*segments[:-1], segments[-1] + ".gguf")


def _link(target: Path, path: Path) -> None:
    try:
        os.symlink(target, path)
    except OSError:  # Windows without developer mode; file systems without links
        try:
            os.link(target, path)
        except OSError:
            shutil.copy2(target, path)


def copy_model(registry, source: str, destination: str) -> Path:
    """A new name for source in Ebbtide's folder; returns the path written."""
    info = registry.get(source)
    models_dir = registry.config.resolved_models_dir()
    path = name_path(models_dir, destination)
    existing = {m.name: m for m in registry.list()}.get(destination)
    if existing is not None and existing.source != "folder":
        raise BadModelName(f"{destination!r} is already the name of a model in the {existing.source} store")
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path):
        path.unlink()
    _link(Path(info.path), path)
    registry.refresh()
    log.info("copied %s to %s (%s)", info.name, destination, path)
    return path


def delete_model(registry, name: str) -> Path:
    """Remove a name from Ebbtide's folder; NotOurs for models anywhere else."""
    info = registry.get(name)
    models_dir = registry.config.resolved_models_dir()
    path = models_dir / (info.name + ".gguf")
    inside = os.path.abspath(path).startswith(os.path.abspath(models_dir) + os.sep)
    if info.source != "folder" or not inside or not os.path.lexists(path):
        raise NotOurs(f"{info.name} is in the {info.source} store ({info.path}); Ebbtide deletes only "
                      f"from its own folder {models_dir}")
    path.unlink()
    for parent in path.parents:  # empty folders a copy made, up to the models folder
        if parent == models_dir or not parent.is_relative_to(models_dir):
            break
        try:
            parent.rmdir()
        except OSError:
            break
    registry.refresh()
    log.info("deleted %s (%s)", info.name, path)
    return path
