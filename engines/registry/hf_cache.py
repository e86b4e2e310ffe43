"""GGUF models in the Hugging Face hub cache.

huggingface_hub stores a repo at <cache>/models--<org>--<name>/ with
snapshots/<revision>/<file> symlinks into blobs/<hash>, and refs/main naming
the revision of the main branch. Each .gguf is named as Ollama names Hugging
Face models, "hf.co/<org>/<name>:<file stem>". Files come from the snapshot
that refs/main points to, and from older snapshots only when main lacks them.
Read-only; a link that leaves the repo's folder is skipped.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from engines.registry.found import Found, is_model_file, resolve_inside

log = logging.getLogger(__name__)

_REPO_DIR = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")
_BLOB_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _snapshots_in_order(repo_dir: Path) -> list[Path]:
    """Snapshot folders, the one refs/main names first, then newest first."""
    snapshots = [p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()]
    try:
        main = (repo_dir / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        main = ""
    snapshots.sort(key=lambda p: (p.name != main, -p.stat().st_mtime))
    return snapshots


def scan_repo(repo_dir: Path, org: str, name: str) -> list[Found]:
    found: dict[str, Found] = {}
    for snapshot in _snapshots_in_order(repo_dir):
        for path in sorted(snapshot.rglob("*.gguf")):
            rel = path.relative_to(snapshot).as_posix()
            if rel in found or not is_model_file(path):
                continue
            real = resolve_inside(path, repo_dir)
            if real is None:
                continue
            stem = rel[: -len(".gguf")]
            # Blobs of LFS files are named by their sha256: the same digest Ollama uses.
            digest = real.name if _BLOB_SHA256.match(real.name) else ""
            found[rel] = Found(name=f"hf.co/{org}/{name}:{stem}", path=str(real), source="hf", digest=digest)
    return list(found.values())


def scan_hf_cache(root: Path) -> list[Found]:
    if not root.is_dir():
        return []
    found: list[Found] = []
    for repo_dir in sorted(root.glob("models--*")):
        match = _REPO_DIR.match(repo_dir.name)
        if match and repo_dir.is_dir():
            found.extend(scan_repo(repo_dir, match["org"], match["name"]))
    return found
