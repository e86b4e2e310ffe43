"""An MoE layer's eager GPU path, through Triton's interpreter: the one-launch routing and
combine (engines/torch/kernels/moe_small.py) against the torch ops SparseMoE runs where
they do not apply, and the quantized experts' [gate | up] buffer from one quantized x
with the down projection reading it gated (quant_experts.gate_up_pairs), against the
same products computed apart. tests/gpu/test_quant_experts_gpu.py runs them on the GPU."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.torch.kernels import moe_small, quant_dp4a, quant_experts  # noqa: E402
from engines.torch.kernels.quant_weight import QuantWeight  # noqa: E402
from engines.torch.model import moe  # noqa: E402
from engines.torch.quant.modules import QuantExperts  # noqa: E402
from tests.engines.quant_blocks import block_bytes  # noqa: E402


def torch_route(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights


def assert_same_routing(ids: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor, k: int,
                        renormalize: bool) -> None:
    """The chosen experts carry the k largest probabilities, largest first, and their weights
    are torch's: where two logits are equal either expert is a right pick (torch.topk's
    order among ties is unspecified), so ids are checked through what they select."""
    want_ids, want_weights = torch_route(logits, k, renormalize)
    probs = torch.softmax(logits.float(), dim=-1)
    torch.testing.assert_close(probs.gather(-1, ids), probs.gather(-1, want_ids), rtol=0, atol=0)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)
    assert all(len(set(row.tolist())) == k for row in ids)     # k distinct experts a token


@pytest.mark.parametrize(("experts", "k"), [(128, 8), (8, 2), (60, 4), (64, 6), (8, 3)])   # Qwen3-MoE, Mixtral, Qwen1.5-MoE, DeepSeek-V2-Lite, a tiny test family
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_picks_the_top_k_as_torch_does(experts: int, k: int, renormalize: bool) -> None:
    gen = torch.Generator().manual_seed(experts + k)
    logits = (torch.randn(5, experts, generator=gen) * 3).to(torch.bfloat16)   # bf16: ties happen
    logits[0] = torch.linspace(-2, 2, experts)            # distinct: the very ids torch picks
    ids, weights = moe_small.route(logits, k, renormalize)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert_same_routing(ids, weights, logits, k, renormalize)
    assert torch.equal(ids[0], torch_route(logits, k, renormalize)[0][0])
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("experts", "dim", "tokens"), [(128, 2048, 1), (8, 1000, 3)])   # Qwen3-MoE; ragged
def test_router_logits_are_the_float32_matvec(experts: int, dim: int, tokens: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(tokens, dim, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(experts, dim, generator=gen) * 0.02).to(torch.bfloat16)
    got = moe_small.router_logits(x, weight)
    assert got.dtype == torch.float32 and got.shape == (tokens, experts)
    torch.testing.assert_close(got, x.float() @ weight.float().t(), rtol=1e-5, atol=1e-5)


def test_router_logits_refuse_a_router_of_another_width() -> None:
    with pytest.raises(ValueError, match="router of"):
        moe_small.router_logits(torch.randn(1, 64), torch.randn(8, 32))


def test_route_refuses_more_experts_than_it_holds() -> None:
    with pytest.raises(ValueError, match="top 9 of 8"):
        moe_small.route(torch.randn(1, 8), 9, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 2048, 1000])
def test_combine_is_the_weighted_sum_rounded_once(dtype: torch.dtype, dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    tokens, k = 3, 8
    y = torch.randn(tokens * k, dim, generator=gen).to(dtype)
    weights = torch.softmax(torch.randn(tokens, k, generator=gen), -1)
    want = (y.view(tokens, k, dim).float() * weights.unsqueeze(-1)).sum(1).to(dtype)
    got = moe_small.combine(y, weights)
    assert got.dtype == dtype and got.shape == (tokens, dim)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7      # float32 summation order, then one rounding
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_combine_refuses_rows_that_are_not_tokens_times_k() -> None:
    with pytest.raises(ValueError, match="not 2 tokens' 8 experts"):
        moe_small.combine(torch.randn(15, 64), torch.ones(2, 8))


# Small: the interpreter runs each program in numpy, one weight row a program at one row of x
EXPERTS, ROWS, K_QUANT_WIDTH = 4, 8, 256


def _stack(type_name: str, out: int, inp: int, seed: int) -> QuantExperts:
    raw = torch.from_numpy(block_bytes(type_name, EXPERTS * out, inp, seed).copy())
    return QuantExperts(QuantWeight.from_gguf(raw, type_name, (EXPERTS * out, inp), "cpu"), EXPERTS, torch.float32)


@pytest.mark.timeout(600)
def test_gate_and_up_share_one_quantized_x_and_write_one_buffer() -> None:
    """Both halves are what each projection's own launch gives (same int8 x, same kernel)."""
    gate, up = _stack("Q4_K", ROWS, K_QUANT_WIDTH, 1), _stack("Q4_K", ROWS, K_QUANT_WIDTH, 2)
    x = torch.randn(2, K_QUANT_WIDTH)
    ids = torch.tensor([3, 0, 1, 3])                       # two tokens, k = 2
    h = quant_experts.gate_up_pairs(x, [gate.qweight, up.qweight], EXPERTS, ids, 2)
    assert h.shape == (4, 2 * ROWS)
    assert torch.equal(h[:, :ROWS], quant_experts._launch_dp4a(x, gate.qweight, EXPERTS, ids, 2))
    assert torch.equal(h[:, ROWS:], quant_experts._launch_dp4a(x, up.qweight, EXPERTS, ids, 2))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K"])   # the integer-dot kernels, the float matvec
def test_one_stack_of_gate_and_up_rows_writes_the_same_buffer_in_one_launch(type_name: str) -> None:
    """The loader's [gate_e | up_e] stack (quant_weight.interleave_stacks): one launch, the
    very values of gate and up launched apart."""
    gate, up = _stack(type_name, ROWS, K_QUANT_WIDTH, 1), _stack(type_name, ROWS, K_QUANT_WIDTH, 2)
    both = quant_experts.stack_gate_up(gate.qweight, up.qweight, EXPERTS)
    assert both.shape == (EXPERTS * 2 * ROWS, K_QUANT_WIDTH)
    x = torch.randn(2, K_QUANT_WIDTH)
    ids = torch.tensor([3, 0, 1, 3])
    h = quant_experts.gate_up_pairs(x, [both], EXPERTS, ids, 2)
    assert torch.equal(h, quant_experts.gate_up_pairs(x, [gate.qweight, up.qweight], EXPERTS, ids, 2))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K"])   # the integer-dot kernels, the float matvec
def test_the_down_projection_reads_the_activation_as_it_loads_x(type_name: str) -> None:
    """gated: the same sums as the activation computed first, rounded to h's dtype, then the pairs."""
    down = _stack(type_name, ROWS, K_QUANT_WIDTH, 3)
    h = torch.randn(4, 2 * K_QUANT_WIDTH)
    ids = torch.tensor([2, 0, 1, 2])
    gate, up = h.chunk(2, dim=-1)
    activated = torch.nn.functional.silu(gate) * up
    launch = quant_experts._launch_dp4a if type_name == "Q4_K" else quant_experts._launch
    got = launch(h, down.qweight, EXPERTS, ids, 1, gated="silu")
    want = launch(activated, down.qweight, EXPERTS, ids, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.timeout(600)
def test_the_fused_eager_path_equals_the_dense_experts(monkeypatch) -> None:
    """quant_experts_forward as the batch-1 graph runs it (routing on the device, the fused
    buffers, combine) against the dense experts over the dequantized weights, within x's
    int8 rounding."""
    torch.manual_seed(0)
    dim = ffn = 32                                         # Q8_0: one block of 32 a row
    gate, up, down = _stack("Q8_0", ffn, dim, 1), _stack("Q8_0", ffn, dim, 2), _stack("Q8_0", dim, ffn, 3)
    x = torch.randn(3, dim)
    ids = torch.tensor([[0, 2], [3, 2], [1, 0]])
    weights = torch.softmax(torch.randn(3, 2), -1)
    monkeypatch.setattr(moe, "_must_not_sync", lambda x: True)
    monkeypatch.setattr(moe_small, "usable", lambda x: True)     # the CPU stands in for the GPU here
    assert quant_dp4a.supports(gate.qweight, 1)                   # emulated under the interpreter
    got = moe.quant_experts_forward(x, ids, weights, (gate, up), down, "silu")
    want = moe._dense(x, ids, weights, gate.weight, up.weight, down.weight, torch.nn.functional.silu)
    assert ((got - want).abs().max() / want.abs().max()).item() < 3e-2
    stacked = QuantExperts(quant_experts.stack_gate_up(gate.qweight, up.qweight, EXPERTS), EXPERTS, torch.float32)
    assert torch.equal(moe.quant_experts_forward(x, ids, weights, (stacked,), down, "silu"), got)
