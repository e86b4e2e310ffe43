"""An unload gives back everything the model took (issue 15): after unload nothing
holds the model's module or its runner, its KV pages are back, and the model loads
and serves again. Real TorchEngine on a tiny random-weight Llama, host-backend KV.
(On CUDA the graphs, their pool and the allocator's cache go too: tests/gpu and
`scripts/gpu_check.sh unload` measure it with NVML.)"""
from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_torch_admission import make_engine, request  # noqa: E402

from engines.types import FinishReason, ModelState  # noqa: E402


@pytest.mark.timeout(120)
def test_unload_leaves_nothing_holding_the_model_and_reload_serves():
    engine = make_engine("gone")
    for cycle in range(2):
        last = list(engine.generate(request(cycle, max_tokens=4)))[-1]
        assert last.finish_reason is FinishReason.LENGTH
        model, runner, pool = weakref.ref(engine.model), weakref.ref(engine.runner), engine.store.cache.pool
        first_weight = next(engine.model.parameters())
        assert first_weight.device.type == "cpu" and engine.memory().kv_held_bytes > 0
        del first_weight
        assert engine.unload() > 0
        gc.collect()
        assert model() is None and runner() is None       # nothing kept the module or runner
        assert engine.state is ModelState.UNLOADED and engine.memory().total_bytes == 0
        assert pool.held() == 0                             # every KV page went back
        engine.load()                                       # and it comes back, and serves
    engine.unload()


def test_a_closed_runner_holds_no_weights():
    engine = make_engine("closed")
    runner, model = engine.runner, engine.model
    try:
        runner.close()
        assert runner.model is None and runner.graphs == {} and runner.decode_forward is None
        assert all(p.device.type == "meta" for p in model.parameters())   # storage released
        runner.close()                                      # idempotent
    finally:
        engine.unload()
