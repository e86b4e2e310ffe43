"""What a load will hold, told before it starts (Engine.load_estimate, issue 19): the
broker admits a load against it, so it must be what the load really takes."""
from __future__ import annotations

import pytest

from engines.llamacpp.engine import LlamaCppEngine
from engines.torch.engine import TorchEngine
from kvcached.standalone import standalone_pool
from llamacpp_support import default_info, small_config


@pytest.mark.parametrize("kind", ["llamacpp", "torch"])
def test_the_estimate_is_what_the_load_holds(kind: str) -> None:
    info = default_info()
    engine = LlamaCppEngine(info, small_config(llama_n_ctx=1024)) if kind == "llamacpp" else \
        TorchEngine(info, small_config(), standalone_pool())
    estimate = engine.load_estimate()
    engine.load()
    try:
        report = engine.memory()
        held = report.weights_bytes + report.kv_held_bytes
    finally:
        engine.unload()
    # llama.cpp: the file and a context's KV, allocated whole; torch on the CPU: float32 weights
    # (4x the Q4_1 file), KV pages only as tokens come.
    assert held * 0.97 <= estimate <= held * 1.05, (estimate, held)
