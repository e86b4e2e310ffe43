"""Stacked quantized experts (engines/torch/kernels/quant_experts.py): each (token, expert)
pair's matrix-vector, the expert read from device memory, against gguf-py's dequantize
and an fp32 matmul; the Triton kernel through the interpreter here."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from engines.torch.kernels import quant_experts
from engines.torch.kernels.quant_weight import BLOCK_TYPES, QuantWeight
from tests.engines.quant_blocks import block_bytes

EXPERTS, OUT = 4, 6
BOUND = 3e-5   # fraction of sum |x * w| per output: fp32 summation order (test_quant_kernels says why)


def _stacked(type_name: str, in_features: int):
    raw = block_bytes(type_name, EXPERTS * OUT, in_features, 3)
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(EXPERTS, OUT, in_features).copy())
    w = QuantWeight.from_gguf(torch.from_numpy(raw.copy()), type_name, (EXPERTS * OUT, in_features), "cpu")
    return w, ref


def _want(x, ref, ids, x_div):
    rows = [x[p // x_div].float() @ ref[e].t() for p, e in enumerate(ids.tolist())]
    scale = [x[p // x_div].float().abs() @ ref[e].abs().t() for p, e in enumerate(ids.tolist())]
    return torch.stack(rows), torch.stack(scale)


@pytest.mark.parametrize("type_name", sorted(BLOCK_TYPES))
@pytest.mark.parametrize("x_div", [1, 2])
def test_each_pair_multiplies_its_own_expert(type_name: str, x_div: int):
    k = 512 if type_name.endswith("_K") else 544
    w, ref = _stacked(type_name, k)
    ids = torch.tensor([3, 0, 3, 1, 2, 2])                      # repeats, any order
    x = torch.randn(len(ids) // x_div, k)
    want, scale = _want(x, ref, ids, x_div)
    for got in (quant_experts._launch(x, w, EXPERTS, ids, x_div),                      # the kernel
                quant_experts.qmatvec_experts_reference(x, w, EXPERTS, ids, x_div)):   # the CPU path
        assert got.shape == (len(ids), OUT)
        assert torch.all((got.float() - want).abs() <= BOUND * scale + 1e-6), (got.float() - want).abs().max()


def test_it_is_one_op_under_torch_compile():
    w, ref = _stacked("Q8_0", 64)
    ids = torch.tensor([1, 2])
    x = torch.randn(1, 64)

    def step(x, ids):
        return quant_experts.qmatvec_experts(x, w, EXPERTS, ids, 2) * 2

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    want, _ = _want(x, ref, ids, 2)
    torch.testing.assert_close(compiled(x, ids).float(), 2 * want, rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q4_0", "Q8_0"])
@pytest.mark.parametrize("x_div", [1, 2])
def test_the_integer_dot_pairs_are_each_expert_times_x_as_quantized(type_name: str, x_div: int):
    """quant_dp4a's kernels over pairs (the CUDA path of its four types), dp4a emulated: each
    pair's product is its expert's weight times its x row as ggml's q8_1 quantizes it."""
    from tests.engines.test_quant_dp4a import q8_1_reference

    k = 512 if type_name.endswith("_K") else 96
    w, ref = _stacked(type_name, k)
    ids = torch.tensor([2, 0, 2, 3, 1, 1])
    x = torch.randn(len(ids) // x_div, k)
    q, d = q8_1_reference(x)
    as_quantized = (q.float().reshape(-1, 32) * d[:, None]).reshape(x.shape)
    want, scale = _want(as_quantized, ref, ids, x_div)
    got = quant_experts._launch_dp4a(x, w, EXPERTS, ids, x_div)
    assert got.shape == (len(ids), OUT)
    assert torch.all((got.float() - want).abs() <= BOUND * scale + 1e-6), (got.float() - want).abs().max()
