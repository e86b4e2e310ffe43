"""Stacked quantized experts on the GPU (engines/torch/kernels/quant_experts.py through
moe.quant_experts_forward): the pairs kernels (the integer-dot ones for Q4_K, Q6_K, Q4_0,
Q8_0; the float matvec for Q5_K), eager and captured in a CUDA graph with the routing
changing between replays, against the dense experts over the dequantized weights (within
x's int8 rounding for the integer-dot types); the eager (per expert hit) path too."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engines.torch.kernels.quant_experts import stack_gate_up  # noqa: E402
from engines.torch.kernels.quant_weight import QuantWeight  # noqa: E402
from engines.torch.model import moe  # noqa: E402
from engines.torch.quant.modules import QuantExperts  # noqa: E402
from tests.engines.quant_blocks import block_bytes  # noqa: E402

EXPERTS, DIM, FFN, K = 8, 512, 256, 2


DP4A_TYPES = ("Q4_K", "Q6_K", "Q4_0", "Q8_0")   # their pairs run on int8 activations (quant_dp4a)


def _close(got: torch.Tensor, want: torch.Tensor, bound: float = 1e-4) -> None:
    """float32 sums in another order over random blocks' large values: relative to the largest."""
    assert ((got - want).abs().max() / want.abs().max()).item() < bound


def _stack(type_name: str, out: int, inp: int, seed: int) -> QuantExperts:
    raw = torch.from_numpy(block_bytes(type_name, EXPERTS * out, inp, seed).copy())
    return QuantExperts(QuantWeight.from_gguf(raw, type_name, (EXPERTS * out, inp), "cuda"), EXPERTS, torch.float32)


@pytest.mark.parametrize("stacked", [False, True])     # gate and up apart, or the loader's one stack
@pytest.mark.parametrize("type_name", [*DP4A_TYPES, "Q5_K"])
def test_pairs_in_a_graph_and_per_expert_eager_equal_the_dense_experts(type_name, stacked, monkeypatch):
    torch.backends.cuda.matmul.allow_tf32 = False
    gate, up, down = _stack(type_name, FFN, DIM, 1), _stack(type_name, FFN, DIM, 2), _stack(type_name, DIM, FFN, 3)
    gate_up = (QuantExperts(stack_gate_up(gate.qweight, up.qweight, EXPERTS), EXPERTS, torch.float32),) \
        if stacked else (gate, up)
    act = torch.nn.functional.silu
    x = torch.randn(3, DIM, device="cuda")
    ids = torch.stack([torch.randperm(EXPERTS, device="cuda")[:K] for _ in range(3)])
    weights = torch.softmax(torch.randn(3, K, device="cuda"), -1)

    def dense():
        return moe._dense(x, ids, weights, gate.weight, up.weight, down.weight, act)

    # x rounded to int8 per 32 (half a step of amax/127) moves the pairs' sums by ~1% at most
    pairs_bound = 3e-2 if type_name in DP4A_TYPES else 1e-4
    eager = moe.quant_experts_forward(x, ids, weights, gate_up, down, "silu")         # per expert hit
    _close(eager, dense())
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with monkeypatch.context() as patch, torch.cuda.stream(side):
        patch.setattr(moe, "_must_not_sync", lambda x: True)                         # the graph's path, eager:
        pairs = moe.quant_experts_forward(x, ids, weights, gate_up, down, "silu")      # Triton compiles here
        _close(pairs, dense(), pairs_bound)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        captured = moe.quant_experts_forward(x, ids, weights, gate_up, down, "silu")   # the pairs kernel
    for _ in range(3):                         # new routing, same buffers: the graph reads it on the device
        ids.copy_(torch.stack([torch.randperm(EXPERTS, device="cuda")[:K] for _ in range(3)]))
        x.normal_()
        graph.replay()
        _close(captured, dense(), pairs_bound)
        with monkeypatch.context() as patch:   # the same kernels outside the graph: the same sums
            patch.setattr(moe, "_must_not_sync", lambda x: True)
            _close(captured, moe.quant_experts_forward(x, ids, weights, gate_up, down, "silu"), 1e-6)


@pytest.mark.parametrize(("experts", "k"), [(128, 8), (8, 2)])
def test_routing_and_combine_kernels_equal_the_torch_ops(experts, k):
    """moe_small's one-launch routing and weighted sum (the eager graph's) on the GPU, and
    inside a CUDA graph with new logits each replay."""
    from engines.torch.kernels import moe_small

    logits = torch.randn(4, experts, device="cuda", dtype=torch.bfloat16) * 3
    y = torch.randn(4 * k, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    router = torch.randn(experts, 2048, device="cuda", dtype=torch.bfloat16) * 0.02

    def torch_ops():
        probs = torch.softmax(logits.float(), -1)
        w, ids = probs.topk(k, -1)
        w = w / w.sum(-1, keepdim=True)
        return ids, w, (y.view(4, k, -1).float() * w.unsqueeze(-1)).sum(1).to(y.dtype)

    moe_small.route(logits, k, True)                      # Triton compiles outside the graph
    moe_small.combine(y, torch.ones(4, k, device="cuda"))
    moe_small.router_logits(x, router)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, weights = moe_small.route(logits, k, True)
        out = moe_small.combine(y, weights)
        router_out = moe_small.router_logits(x, router)
    for _ in range(3):
        logits.normal_(0, 3)
        x.normal_()
        graph.replay()
        torch.testing.assert_close(router_out, x.float() @ router.float().t(), rtol=1e-4, atol=1e-4)
        want_ids, want_w, want_out = torch_ops()
        # bf16 logits tie often (seen at 128 experts on the H100): equal probabilities may be
        # picked in another order than torch.topk's; what each pick selects must be the same
        probs = torch.softmax(logits.float(), -1)
        assert torch.equal(probs.gather(-1, ids), probs.gather(-1, want_ids))
        torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(out.float(), want_out.float(), rtol=2 ** -7, atol=2 ** -7)
