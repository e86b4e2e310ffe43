"""Capturing a CUDA graph in a process where other models keep working.

The daemon serves several models, each on its own threads: while one captures a
decode graph (at load, or a pending bucket while it is idle), another loads its
weights or runs its steps. torch captures in CUDA's "global" mode by default,
where a potentially unsafe call from any other thread (a cudaMalloc by another
model's load) fails that call and invalidates the capture. Measured on the H100
(exhaustion benchmark, two models): a pending capture of one model while the other
loaded failed both, and left torch's default CUDA generator marked as capturing,
so every later random draw of the process failed ("Offset increment outside graph
capture encountered unexpectedly") and every later load answered 500.

So a capture here:
- runs in "thread_local" mode: only this thread's own unsafe calls are refused,
  other threads' work neither fails nor breaks the capture;
- holds kvcached's device_sync lock: one capture at a time (torch registers its
  default generator with the graph being captured, one graph at a time), and no
  whole-device wait from another thread meanwhile (a trim's cuCtxSynchronize, an
  unload's empty_cache: CUDA refuses those during a capture and the capture fails;
  device_sync says what that cost on the H200);
- if it fails anyway, ends the caching allocator's routing of this thread's
  allocations into the graph's pool (torch skips that when the capture's end
  fails: every later allocation of the thread went into a pool nothing frees);
- if it fails anyway, gives the default generator a fresh state object, so
  the failure stays this capture's and not the whole process's.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from kvcached.vmm import device_sync

log = logging.getLogger(__name__)

CAPTURE_MODE = "thread_local"


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool: object | None, device: torch.device) -> Iterator[None]:
    """`with capturing(graph, pool, device): forward()` records forward() into graph."""
    with device_sync.exclusive():
        try:
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=CAPTURE_MODE):
                yield
        except BaseException:
            end_pool_routing(graph, device)
            reset_default_generator(device)
            raise


def end_pool_routing(graph: torch.cuda.CUDAGraph, device: torch.device) -> bool:
    """After a failed capture, undo what its start did to the caching allocator, which
    torch's capture_end skips when it raises: stop sending this stream's allocations to
    the graph's private pool, and drop the capture's use of that pool (a graph that never
    finished does not release it when destroyed), so its blocks can go back to the driver.
    Private torch hooks: False where this torch lacks them or they refuse."""
    end_allocate = getattr(torch._C, "_cuda_endAllocateToPool", None)
    release = getattr(torch._C, "_cuda_releasePool", None)
    if end_allocate is None or release is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        end_allocate(index, graph.pool())
        release(index, graph.pool())
    except RuntimeError as exc:   # the capture got far enough to end its routing itself
        log.debug("a failed capture's pool left as it was: %s", exc)
        return False
    return True


def reset_default_generator(device: torch.device) -> bool:
    """After a failed capture: the default CUDA generator of device, left in capture mode
    (its epilogue never ran), gets a copy of its state that is not capturing. Seed and
    offset are kept. False where this torch has no graph-safe generator states."""
    generator = torch.cuda.default_generators[device.index if device.index is not None
                                              else torch.cuda.current_device()]
    if not (hasattr(generator, "clone_state") and hasattr(generator, "graphsafe_set_state")):
        return False
    try:
        generator.graphsafe_set_state(generator.clone_state())
    except RuntimeError as exc:   # reported, not raised: the capture's own error is the one to see
        log.warning("resetting the CUDA generator after a failed capture failed: %s", exc)
        return False
    log.warning("a CUDA graph capture failed: the default CUDA generator was reset out of capture mode")
    return True
