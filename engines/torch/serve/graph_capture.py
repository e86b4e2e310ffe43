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
- if it fails anyway, gives the default generator a fresh state object, so
  the failure stays this capture's and not the whole process's.

A compiled step's warm-up (where torch.compile compiles) and its capture run as one
piece, one model of the process at a time (`one_compile_at_a_time`): every model's
compiled step is the same code object (Runner._decode_forward), and Dynamo's frame
cache and global state are the process's. On the H200 (exhaustion benchmark) two models
compiled their batch-2 steps at once (52 s), then one's capture failed in its own
thread ("operation not permitted when stream is capturing"), as a recompile inside the
capture does (Inductor's autotuning synchronizes). Serialized, no other model's compile
runs between a step's warm-up, which settles its guards, and its capture. Eager steps
(the batch-1 graph a load captures, so a cold model's first request waits for no
compile) do not wait, and an idle model's pending captures do not wait either
(`compile_turn`: they try again a second later, so its requests and reclaims never sit
behind another model's compile).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import torch

from kvcached.vmm import device_sync

log = logging.getLogger(__name__)

CAPTURE_MODE = "thread_local"
_COMPILED_STEPS = threading.RLock()    # one compiled step warmed up and captured at a time


@contextlib.contextmanager
def one_compile_at_a_time(compiled: bool) -> Iterator[None]:
    """Around a step's warm-up and capture: where the step is compiled, no other model's
    compiled warm-up or capture runs meanwhile (the module docstring says why)."""
    with _COMPILED_STEPS if compiled else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def compile_turn(compiled: bool) -> Iterator[bool]:
    """one_compile_at_a_time that never waits: yields False, holding nothing, while another
    model compiles or captures a compiled step, so an idle model does not sit behind that
    compile (~50 s) under its step lock, where a request or a reclaim would wait too."""
    if not compiled:
        yield True
        return
    if not _COMPILED_STEPS.acquire(blocking=False):
        yield False
        return
    try:
        yield True
    finally:
        _COMPILED_STEPS.release()


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool: object | None, device: torch.device) -> Iterator[None]:
    """`with capturing(graph, pool, device): forward()` records forward() into graph."""
    with device_sync.exclusive():
        try:
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=CAPTURE_MODE):
                yield
        except BaseException:
            reset_default_generator(device)
            raise


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
