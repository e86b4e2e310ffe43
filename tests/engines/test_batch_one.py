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
def test_a_batch_one_graph_is_kept_only_where_it_is_clearly_faster(eager_ms, compiled_ms, kept):
    assert batch_one.beats_compiled(eager_ms, compiled_ms) is kept


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


class _FakeGraph:
    """DecodeGraph's place in the bookkeeping (capturing one needs CUDA): its kind and whether closed."""
    def __init__(self, runner, batch, read_len, tokens, positions, slots, repeated=False):
        self.batch, self.read_len, self.repeated, self.closed = batch, read_len, repeated, False

    @property
    def kind(self) -> str:
        return "repeated" if self.repeated else "eager" if self.batch == 1 else "compiled"

    def close(self):
        self.closed = True


def _graphed_runner(monkeypatch, times: dict[str, float]) -> Runner:
    import engines.torch.serve.runner as runner_module
    monkeypatch.setattr(runner_module, "DecodeGraph", _FakeGraph)
    monkeypatch.setattr(batch_one, "replay_ms", lambda graph, slot: times[graph.kind])
    store = StaticStore(kv_layout(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, torch.float32, 4, 512, 64 * 1024),
                        torch.float32, torch.device("cpu"))
    runner = Runner(synthetic_model(CFG, "cpu", torch.float32, seed=0), store, use_graphs=False, compile=True)
    runner.use_graphs = True          # what a CUDA runner is; the graphs themselves are fakes
    runner.read_buckets = [256, 512]  # two read lengths, as without the Triton attention kernel
    return runner


# Replay times (ms) of the three graphs batch 1 may run, and the one kept. The first two
# rows are the H100's 8B Q4_K_M and SmolLM2 figures for eager and compiled-as-2.
CASES = [({"eager": 4.09, "repeated": 9.0, "compiled": 5.14}, "eager"),
         ({"eager": 2.03, "repeated": 1.10, "compiled": 1.07}, "compiled"),
         ({"eager": 4.09, "repeated": 3.40, "compiled": 5.14}, "repeated")]


@pytest.mark.parametrize("times, kept", CASES)
def test_eager_first_then_decide_after_the_first_compiled_bucket(monkeypatch, times, kept):
    runner = _graphed_runner(monkeypatch, times)
    assert batch_one.eager_first(runner, slot=0)
    assert list(runner.graphs) == [(1, 256)] and runner.batch_buckets == [1, 2, 4]
    assert set(runner.pending) == set(runner.warm_keys()) - {(1, 256)}   # the compile waits for idle time
    eager = runner.graphs[(1, 256)]
    batch_one.decide(runner, slot=1)                # nothing compiled yet: nothing to compare
    assert runner.batch_one_undecided
    runner.graphs[(2, 256)] = _FakeGraph(runner, 2, 256, [0], [0], [1])   # the idle loop's first capture
    runner.pending.remove((2, 256))
    batch_one.decide(runner, slot=1)
    assert not runner.batch_one_undecided and eager.closed is (kept != "eager")
    assert (1 in runner.batch_buckets) is (kept != "compiled")
    if kept != "compiled":
        assert runner.graphs[(1, 256)].kind == kept and runner.batch_one_kind == kept
        assert (1, 512) in runner.pending         # captured later, of the kind kept (Runner.new_graph)
        assert runner.new_graph(1, 512, [0], [0], [1]).kind == kept
    assert set(runner.graphs) | set(runner.pending) == set(runner.warm_keys())


@pytest.mark.parametrize("times, kept", CASES)
def test_choose_after_a_full_warm_up_keeps_the_fastest(monkeypatch, times, kept):
    runner = _graphed_runner(monkeypatch, times)
    runner.graphs = {key: _FakeGraph(runner, *key, [0], [0], [0]) for key in runner.warm_keys()}
    batch_one.choose(runner, slot=0)
    if kept == "compiled":
        assert 1 not in runner.batch_buckets and runner.pending == [] and all(k[0] != 1 for k in runner.graphs)
    else:
        assert runner.batch_buckets[0] == 1 and runner.graphs[(1, 256)].kind == kept
        assert runner.pending == [(1, 512)]


def test_the_idle_captures_decide_batch_one_and_report_their_time(monkeypatch):
    runner = _graphed_runner(monkeypatch, CASES[2][0])       # the repeated graph wins
    phases = runner.phase_seconds = {"read": 1.0}
    batch_one.eager_first(runner, slot=0)
    while runner.capture_pending(slot=1):                     # what the serving loop does while idle
        pass
    assert runner.batch_one_kind == "repeated" and set(runner.graphs) == set(runner.warm_keys())
    assert all(graph.kind == "repeated" for key, graph in runner.graphs.items() if key[0] == 1)
    assert phases["read"] == 1.0 and phases["capture_while_idle"] > 0
