"""A CUDA graph captured while another thread of the process allocates and draws random
numbers (engines/torch/serve/graph_capture.py). In the exhaustion benchmark on the H100
one model's pending capture and another model's load broke each other, and the default
CUDA generator stayed in capture mode for the rest of the process (every load after it
failed). Here: the capture and the other thread's work both succeed, and a failed
capture leaves the default generator usable."""
from __future__ import annotations

import threading
import time

import torch

from engines.torch.serve.graph_capture import capturing
from kvcached.config import KvcachedConfig
from kvcached.vmm.cuda import CudaBackend

DEVICE = torch.device("cuda", 0)


def _matmul_graph(x: torch.Tensor, side: torch.cuda.Stream) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    with torch.cuda.stream(side):
        (x @ x).sum()                                       # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with capturing(graph, None, DEVICE):
        out = x @ x
        for _ in range(200):                                # long enough for the other thread to run
            out = torch.tanh(out @ x)
    return graph, out


def test_a_capture_and_another_threads_allocations_both_succeed():
    x = torch.randn(256, 256, device=DEVICE) / 16
    side = torch.cuda.Stream(DEVICE)
    stop, errors, made = threading.Event(), [], []

    def other_model() -> None:
        # Fresh segments (cudaMalloc) and random draws from a generator of its own, as a
        # model's load and its sampling do. Not the default generator: torch registers it
        # with the graph being captured, and draws from it in another thread meanwhile fail
        # in torch itself (the engine draws nothing from it: fused_linear, synthetic weights
        # and sampling use none).
        generator = torch.Generator(device=DEVICE).manual_seed(0)
        try:
            while not stop.is_set():
                block = torch.empty(16 << 20, dtype=torch.float32, device=DEVICE)
                made.append(block.normal_(generator=generator).sum())
                made.pop()
                del block
                torch.cuda.empty_cache()
        except Exception as exc:   # noqa: BLE001 - asserted below
            errors.append(exc)

    worker = threading.Thread(target=other_model)
    worker.start()
    try:
        for _ in range(5):
            graph, out = _matmul_graph(x, side)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.isfinite(out).all()
    finally:
        stop.set()
        worker.join()
    assert not errors, errors


def test_a_failed_capture_leaves_the_default_generator_usable():
    graph = torch.cuda.CUDAGraph()
    try:
        with capturing(graph, None, DEVICE):
            torch.cuda.synchronize()                        # not allowed while capturing: fails it
    except Exception:  # noqa: BLE001 - the failure is the point
        pass
    torch.randn(16, device=DEVICE)                          # raised for the rest of the process before
    torch.cuda.synchronize()


def test_a_trims_device_wait_during_another_threads_capture_breaks_neither():
    """The H200 exhaustion run: the pressure reclaim's trim (cuCtxSynchronize before it
    unmaps) ran while another model captured an idle graph, and CUDA refused the wait
    (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED) and invalidated the capture. The wait now
    holds kvcached's device_sync lock, as the capture does."""
    backend = CudaBackend(KvcachedConfig())
    x = torch.randn(256, 256, device=DEVICE) / 16
    side = torch.cuda.Stream(DEVICE)
    inside, errors = threading.Event(), []

    def trim() -> None:
        inside.wait(5)
        try:
            backend.synchronize()
        except Exception as exc:   # noqa: BLE001 - asserted below
            errors.append(exc)

    worker = threading.Thread(target=trim)
    worker.start()
    try:
        with torch.cuda.stream(side):
            (x @ x).sum()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with capturing(graph, None, DEVICE):
            out = x @ x
            inside.set()
            time.sleep(0.3)                                 # the trim asks meanwhile
            out = torch.tanh(out @ x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
    finally:
        worker.join(10)
        backend.close()
    assert not errors, errors

