"""The model registry: every GGUF model the user already has, found read-only.

Sources are siblings, one file each (bundled, folders, ollama, lmstudio,
hf_cache); registry.ModelRegistry merges them and reads each file's header
(gguf_meta) into an engines.base.ModelInfo.
"""
from engines.registry.registry import ModelRegistry

__all__ = ["ModelRegistry"]
