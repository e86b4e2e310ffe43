"""The CUDA libraries every model on the GPU uses, set up once per process.

Why: the first model's load does more than load the model. cuBLAS and cuBLASLt
create their handles, and CUDA loads the code of each kernel the first time it
runs (lazy module loading); all of it stays in the CUDA context until the process
ends, and no unload can give it back (torch cannot tear down and re-create its
context in a live process). On the H100 that was 80 MiB after the first unload
of a SmolLM2-135M model, the same after every later one (issue 14's GPU run).
The daemon pays the library part when it opens the GPU, not on the first load,
so "before the first load" is the level every unload returns to.
"""
from __future__ import annotations

import logging
import threading

import torch

from engines.torch.cublas_pool import handles_without_own_pool
from kvcached.vmm import device_sync

log = logging.getLogger(__name__)


def warm_up_libraries(device: torch.device) -> None:
    """cuBLAS's own per-handle pools turned off first (cublas_pool.py: torch brings each handle
    its workspace), then one bf16 GEMM, the GEMV shape decode uses and one attention, and give the
    allocator's blocks and cuBLAS's workspaces back: what stays is what only the
    context can hold (handles and kernel code). On a thread that ends: torch's cuBLAS
    handles are per thread and go back to its pool when the thread ends, for the
    serving thread of the first model to take."""
    if device.type != "cuda":
        return
    with torch.cuda.device(device):
        torch.cuda.init()
        own_pool_mib = handles_without_own_pool(lambda: torch.cuda.mem_get_info(device)[0])
    if own_pool_mib is not None:
        log.info("cuBLAS handles hold %.0f MiB of their own (torch gives them its workspace)", own_pool_mib)
    failure: list[BaseException] = []
    worker = threading.Thread(target=_exercise, args=(device, failure), name="cuda-warm-up")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]


def _exercise(device: torch.device, failure: list[BaseException]) -> None:
    try:
        with torch.inference_mode():
            a = torch.randn(256, 256, dtype=torch.bfloat16, device=device)
            (a @ a).sum().item()                                   # cuBLAS(Lt) GEMM
            (a[:2] @ a).sum().item()                               # the decode GEMV path
            q = torch.randn(1, 4, 16, 64, dtype=torch.bfloat16, device=device)
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()
        torch.cuda.synchronize(device)
        release_library_blocks()
    except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
        failure.append(exc)


def release_library_blocks() -> None:
    """cuBLAS's workspaces (one per handle and stream, which empty_cache does not free),
    then the caching allocator's free blocks, back to the driver."""
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    with device_sync.exclusive():   # frees device memory: never during another thread's capture
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()


_STREAMS: dict[tuple[str, torch.device], torch.cuda.Stream] = {}


def process_stream(device: torch.device, role: str) -> torch.cuda.Stream:
    """One stream per (role, device) for the process's life, made on first use. Why not a
    new one per user: cuBLAS keeps a workspace per (handle, stream) it ran on, which
    empty_cache does not free, and torch hands out its pooled streams round-robin, so a
    stream per model left another workspace pair behind after each load (issue 14's GPU
    run: 64 MiB more held after every unload)."""
    key = (role, device)
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = torch.cuda.Stream(device)
    return stream
