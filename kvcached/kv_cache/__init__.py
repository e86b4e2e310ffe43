"""The KV cache over virtual tensors: layout (token-major slot regions), slot
placement, the manager the torch engine uses, and pause/resume to host memory.

KVCache is imported lazily so the torch-free arithmetic (layout, placement)
imports without torch.
"""
from kvcached.kv_cache.layout import KVLayout, KVShape

__all__ = ["KVCache", "KVLayout", "KVShape"]


def __getattr__(name: str):
    if name == "KVCache":
        from kvcached.kv_cache.manager import KVCache
        return KVCache
    raise AttributeError(name)
