"""Batch 1 of a compiled model: the choice between its eager graph and the compiled
one padded to 2 (engines/torch/serve/batch_one.py; the graphs themselves are captured
and timed in tests/gpu/test_torch_warmup_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from engines.torch.model.configs import ModelConfig
from engines.torch.model.synthetic import synthetic_model
from engines.torch.serve import batch_one
from engines.torch.serve.kv_access import StaticStore, kv_layout
from engines.torch.serve.runner import Runner


@pytest.mark.parametrize("eager_ms, compiled_ms, kept", [
    (4.09, 5.14, True),     # Llama-3.1-8B Q4_K_M on the H100: the one-row dp4a launch wins
    (2.03, 1.07, False),    # SmolLM2-135M: bound by launches, the compiled step wins
    (4.00, 4.05, False),    # within the replays' noise: the compiled graph stays
])
def test_eager_batch_one_is_kept_only_where_it_is_clearly_faster(eager_ms, compiled_ms, kept):
    assert batch_one.keep_eager(eager_ms, compiled_ms) is kept


CFG = ModelConfig(vocab_size=64, dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                  ffn_dim=64, max_context=64, eos_ids=())


def _runner() -> Runner:
    store = StaticStore(kv_layout(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, torch.float32, 4, 64, 64 * 1024),
                        torch.float32, torch.device("cpu"))
    return Runner(synthetic_model(CFG, "cpu", torch.float32, seed=0), store, use_graphs=False, compile=True)


def test_compiled_batch_one_graphs_capture_the_eager_step():
    runner = _runner()
    assert runner.batch_buckets[0] == 2                       # batch 1 runs as 2 unless chosen
    assert runner.forward_for(1) == runner._decode_forward    # a batch-1 graph never compiles
    assert runner.forward_for(2) is runner.decode_forward


def test_choose_is_a_no_op_without_graphs():
    runner = _runner()
    batch_one.choose(runner, slot=0)
    assert runner.graphs == {} and 1 not in runner.batch_buckets
