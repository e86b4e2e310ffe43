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


def test_captures_run_thread_local_and_one_at_a_time(monkeypatch):
    seen: list[tuple[str, bool]] = []

    @contextlib.contextmanager
    def fake_graph(graph, pool=None, capture_error_mode="global"):
        seen.append((capture_error_mode, graph_capture._CAPTURE_LOCK.locked()))
        yield

    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    with graph_capture.capturing(object(), None, torch.device("cuda", 0)):
        pass
    assert seen == [("thread_local", True)]
    assert not graph_capture._CAPTURE_LOCK.locked()


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
        with graph_capture.capturing(object(), None, device):
            pass
    assert resets == [device]
    acquired = graph_capture._CAPTURE_LOCK.acquire(timeout=1)   # another model can capture next
    assert acquired
    graph_capture._CAPTURE_LOCK.release()


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
