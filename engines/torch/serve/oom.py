"""Out-of-memory in a load or a step, as the engines' one temporary error.

When another application takes the GPU, any allocation of a load or a step can
fail: torch's caching allocator (torch.OutOfMemoryError), a KV page
(kvcached DeviceOutOfMemory / PoolExhausted). On the H200 these surfaced as
HTTP 500 "CUDA out of memory" (issue 15). Here each becomes
engines.errors.OutOfMemory, a TemporaryError the HTTP layer answers with 503
and Retry-After, and the allocator's cached blocks are handed back so the
retry, and the other application, find them. Recognized by type, never by text.
"""
from __future__ import annotations

import logging

import torch

from engines.errors import OutOfMemory
from kvcached.errors import TemporaryError
from kvcached.vmm import device_sync

log = logging.getLogger(__name__)

# torch >= 2.1 names it torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class).
TORCH_OOM: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, TORCH_OOM)


def as_temporary(exc: BaseException, what: str) -> BaseException:
    """`exc` as the error a caller should see: an allocator OOM becomes OutOfMemory
    (chained to it), a kvcached temporary error stays what it is, others unchanged."""
    if isinstance(exc, TemporaryError) or not is_out_of_memory(exc):
        return exc
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    typed = OutOfMemory(f"{what}: the GPU had no memory left ({first_line}); another application "
                        "holds it. Retry when it has given memory back.")
    typed.__cause__ = exc
    return typed


def give_back_cached_blocks() -> None:
    """After an out-of-memory: the caching allocator's free blocks back to the driver."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device_sync.empty_cache()
