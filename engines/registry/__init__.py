"""The model registry: every GGUF model the user already has, found read-only.

Sources are siblings, one file each (bundled, folders, ollama, lmstudio,
hf_cache); registry.ModelRegistry merges them and reads each file's header
(gguf_meta) into an engines.base.ModelInfo. ModelRegistry is imported lazily,
so `engines.registry.bundled` works where the gguf package is absent (the
GPU benchmark machine).
"""
from __future__ import annotations

from typing import Any

__all__ = ["ModelRegistry"]


def __getattr__(name: str) -> Any:
    if name == "ModelRegistry":
        from engines.registry.registry import ModelRegistry

        return ModelRegistry
    raise AttributeError(f"module 'engines.registry' has no attribute {name!r}")
