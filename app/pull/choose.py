"""Which GGUF file(s) of a Hugging Face repo to pull, from the repo's file list.

With a quant tag: the model file whose name carries it (engines.registry.quant_tags);
none, or several different ones, is an error that lists the tags there are. Without:
the first of DEFAULT_QUANTS the repo has (Q4_K_M first, as Ollama), else the only
model file, else the smallest. Vision projectors (mmproj) are never chosen; a split
model (-00001-of-0000N) brings all its parts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from app.pull.errors import NothingToPull
from engines.registry.found import is_model_file
from engines.registry.quant_tags import files_for_tag, stem

# Ollama's default for hf.co names is Q4_K_M; then the usual next-best trade-offs.
DEFAULT_QUANTS = ("Q4_K_M", "Q4_0", "Q5_K_M", "Q4_K_S", "Q5_0", "Q6_K", "Q8_0", "Q4_1")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class RepoFile:
    path: str              # the file's path in the repo
    size: int | None       # bytes, as the hub lists it
    sha256: str | None     # LFS files' sha256, as the hub lists it


def _parts(files: list[RepoFile], first: RepoFile) -> list[RepoFile]:
    """A split model's every part (first included), in order; just first otherwise."""
    match = _SHARD.search(first.path)
    if match is None:
        return [first]
    prefix = first.path[: match.start()]
    parts = sorted((f for f in files if f.path.startswith(prefix) and _SHARD.search(f.path)), key=lambda f: f.path)
    return parts


def model_files(files: list[RepoFile]) -> list[RepoFile]:
    return [f for f in files if is_model_file(PurePosixPath(f.path))]


def available_tags(files: list[RepoFile]) -> list[str]:
    return sorted({stem(f.path).rsplit("-", 1)[-1].rsplit(".", 1)[-1] for f in model_files(files)})


def choose_files(files: list[RepoFile], quant: str | None, repo_id: str) -> list[RepoFile]:
    candidates = model_files(files)
    if not candidates:
        raise NothingToPull(f"{repo_id} has no GGUF model file")
    by_path = {f.path: f for f in candidates}
    if quant is not None:
        found = files_for_tag(by_path, quant)
        if len({stem(p) for p in found}) != 1:
            what = "no file" if not found else f"{len(found)} files ({', '.join(found[:4])})"
            raise NothingToPull(f"{repo_id} has {what} for quant {quant!r}; its files carry "
                                f"{', '.join(available_tags(files))}")
        return _parts(files, by_path[found[0]])
    for tag in DEFAULT_QUANTS:
        found = files_for_tag(by_path, tag)
        if found:
            return _parts(files, by_path[found[0]])
    smallest = min(candidates, key=lambda f: (f.size is None, f.size or 0, f.path))
    return _parts(files, smallest)
