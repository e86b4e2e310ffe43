"""engines/torch/serve/graph_capture.py on the CPU: the mode it captures in, one capture at
a time, and the generator reset after a failure (the CUDA side runs in
tests/gpu/test_graph_capture_gpu.py)."""
from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from engines.torch.model.mlp import fused_linear
from engines.torch.serve import graph_capture
from kvcached.vmm import device_sync


def _held_elsewhere() -> bool:
    """Whether a thread other than the caller holds device_sync's lock."""
    got: list[bool] = []

    def probe() -> None:
        got.append(device_sync._LOCK.acquire(timeout=0.05))
        if got[0]:
            device_sync._LOCK.release()

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return not got[0]


def test_captures_run_thread_local_and_one_at_a_time(monkeypatch):
    seen: list[tuple[str, bool]] = []

    @contextlib.contextmanager
    def fake_graph(graph, pool=None, capture_error_mode="global"):
        seen.append((capture_error_mode, _held_elsewhere()))
        yield

    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    with graph_capture.capturing(object(), None, torch.device("cuda", 0)):
        pass
    assert seen == [("thread_local", True)]
    assert not _held_elsewhere()


class _Graph:
    def pool(self) -> tuple[int, int]:
        return (0, 7)


def test_a_failed_capture_resets_the_generator_and_frees_the_lock(monkeypatch):
    resets: list[torch.device] = []

    @contextlib.contextmanager
    def failing_graph(graph, pool=None, capture_error_mode="global"):
        yield
        raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "graph", failing_graph)
    monkeypatch.setattr(graph_capture, "reset_default_generator", resets.append)
    device = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="during capture"):
        with graph_capture.capturing(_Graph(), None, device):
            pass
    assert resets == [device]
    assert not _held_elsewhere()   # another model can capture next


def test_a_whole_device_wait_from_another_thread_waits_for_the_capture(monkeypatch):
    """A trim's or an unload's device-wide wait during another model's capture failed both
    on the H200 (kvcached/vmm/device_sync.py); it now waits for the capture to end."""
    order: list[str] = []
    inside, release = threading.Event(), threading.Event()

    @contextlib.contextmanager
    def slow_graph(graph, pool=None, capture_error_mode="global"):
        order.append("capture begins")
        inside.set()
        release.wait(5)
        yield
        order.append("capture ends")

    monkeypatch.setattr(torch.cuda, "graph", slow_graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: order.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: order.append("empty_cache"))

    def capture() -> None:
        with graph_capture.capturing(_Graph(), None, torch.device("cuda", 0)):
            pass

    def unload() -> None:
        device_sync.synchronize_device()
        device_sync.empty_cache()

    capturer = threading.Thread(target=capture)
    capturer.start()
    inside.wait(5)
    waiter = threading.Thread(target=unload)
    waiter.start()
    waiter.join(0.2)
    assert order == ["capture begins"]          # the wait did not run during the capture
    release.set()
    capturer.join(5)
    waiter.join(5)
    assert order == ["capture begins", "capture ends", "synchronize", "empty_cache"]


def test_a_second_capture_waits_for_the_first(monkeypatch):
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    @contextlib.contextmanager
    def slow_graph(graph, pool=None, capture_error_mode="global"):
        order.append(f"begin {graph}")
        if graph == "a":
            inside.set()
            release.wait(5)
        yield
        order.append(f"end {graph}")

    monkeypatch.setattr(torch.cuda, "graph", slow_graph)

    def capture(name: str) -> None:
        with graph_capture.capturing(name, None, torch.device("cuda", 0)):
            pass

    first = threading.Thread(target=capture, args=("a",))
    first.start()
    inside.wait(5)
    second = threading.Thread(target=capture, args=("b",))
    second.start()
    second.join(0.2)
    assert order == ["begin a"]            # b waits while a captures
    release.set()
    first.join(5)
    second.join(5)
    assert order == ["begin a", "end a", "begin b", "end b"]


def test_fusing_projections_draws_nothing_from_the_default_generator():
    parts = [torch.nn.Linear(8, n, bias=True) for n in (4, 2, 2)]
    before = torch.random.get_rng_state()
    fused = fused_linear(*parts)
    assert torch.equal(torch.random.get_rng_state(), before)
    x = torch.randn(3, 8)
    assert torch.allclose(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    assert fused.weight.device.type == "cpu" and not fused.weight.requires_grad


def test_compiled_steps_warm_up_and_capture_one_model_at_a_time():
    """A compiled step's warm-up (its compile) and capture are one piece, one model at a time;
    an eager step (the batch-1 graph a load captures) never waits for another's compile."""
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def step(name: str, compiled: bool) -> None:
        with graph_capture.one_compile_at_a_time(compiled):
            order.append(f"begin {name}")
            if name == "a":
                inside.set()
                release.wait(5)
            order.append(f"end {name}")

    first = threading.Thread(target=step, args=("a", True))
    first.start()
    inside.wait(5)
    eager = threading.Thread(target=step, args=("eager", False))
    eager.start()
    eager.join(5)
    second = threading.Thread(target=step, args=("b", True))
    second.start()
    second.join(0.2)
    assert order == ["begin a", "begin eager", "end eager"]     # b waits while a compiles
    release.set()
    first.join(5)
    second.join(5)
    assert order[3:] == ["end a", "begin b", "end b"]
