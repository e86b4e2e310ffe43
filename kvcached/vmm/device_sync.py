"""One process-wide lock between CUDA graph captures and whole-device waits.

A capture records one thread's stream, in CUDA's thread-local mode so other
threads' allocations and launches go on meanwhile (engines/torch/serve/graph_capture.py).
A whole-device wait from another thread is not among them: a cuCtxSynchronize
(a trim's or a pause's, before it unmaps pages), a cudaDeviceSynchronize or the
caching allocator's empty_cache (cudaFree) waits on the capturing stream too,
which CUDA refuses (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED) and which invalidates
the capture. Measured on the H200 (exhaustion benchmark, two models): the pressure
reclaim's trim of one model during the other's idle capture failed both, and every
unload after it left 264-678 MiB in the caching allocator (2 MiB on the H100 run
before, where the two never met). A GPU test (tests/gpu/test_graph_capture_gpu.py)
has the wait and the capture on two threads: both succeed.

So a capture holds `exclusive()` while it records, and every whole-device wait
here or in the engines goes through `synchronize_device` / `empty_cache` (or holds
`exclusive()` around its own): it waits for a capture running on another thread
instead of breaking it. Captures take milliseconds to a few seconds; waits are
leaves (nothing holding this lock takes another lock of ours), so no cycle forms.
Reentrant: a thread that holds it may wait on the device again.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_LOCK = threading.RLock()


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """No capture runs on another thread while this is held (and no other holder)."""
    with _LOCK:
        yield


def synchronize_device(device: torch.device | None = None) -> None:
    """torch.cuda.synchronize, never during another thread's capture."""
    with _LOCK:
        torch.cuda.synchronize(device)


def empty_cache() -> None:
    """The caching allocator's free blocks back to the driver (cudaFree waits on the
    device), never during another thread's capture."""
    with _LOCK:
        torch.cuda.empty_cache()
