"""The quantized kernels on CUDA, per type: dequantize bit-exact against the torch
decoders, qlinear on each path (decode matvec, split-K, prefill) within its bound,
rows(), and qlinear captured in a CUDA graph and replayed on new inputs.

Bounds, as a fraction of sum_k |x_k * w_k| per output (x is bf16 and rounded the
same way for the reference, so the decoders' exactness leaves only):
- matvec: fp32 accumulation then one bf16 rounding of the output, 2^-8;
- prefill: the weight rounded to bf16 too (2^-9 each) and cuBLAS's bf16 output, 2^-7.
"""
from __future__ import annotations

import pytest
import torch

from engines.torch.kernels import quant_kernels
from engines.torch.kernels.quant_ops import qlinear
from engines.torch.kernels.quant_weight import BLOCK_TYPES, QuantWeight
from engines.torch.load.dequant import dequantize_raw
from tests.engines.quant_blocks import random_blocks

CUDA = torch.device("cuda")
OUT = 300          # not a multiple of any BN: the last program is ragged
MATVEC_BOUND, PREFILL_BOUND = 2.0 ** -8, 2.0 ** -7


def _in_features(type_name: str) -> int:
    return 1024 if type_name.endswith("_K") else 1056   # legacy: 33 blocks, a ragged last chunk


def _raw(type_name: str, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(random_blocks(type_name, OUT, _in_features(type_name), seed).copy())


def _weight(type_name: str, seed: int = 0) -> tuple[QuantWeight, torch.Tensor]:
    raw, shape = _raw(type_name, seed), (OUT, _in_features(type_name))
    ref = dequantize_raw(raw, type_name, shape)   # CPU torch decoders, checked against gguf-py
    return QuantWeight.from_gguf(raw, type_name, shape, CUDA), ref


def _assert_within(got: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, bound: float):
    xf = x.float().cpu()
    want, scale = xf @ ref.t(), xf.abs() @ ref.abs().t()
    err = (got.float().cpu() - want).abs()
    assert torch.all(err <= bound * scale + 1e-3), (err / (scale + 1e-3)).max()


@pytest.mark.parametrize("type_name", sorted(BLOCK_TYPES))
def test_dequantize_exact_and_rows(type_name: str):
    w, ref = _weight(type_name)
    assert w.nbytes() == _raw(type_name).numel()
    assert torch.equal(w.raw_rows().cpu(), _raw(type_name))
    assert torch.equal(quant_kernels.dequantize(w, torch.float32).cpu(), ref)
    ids = torch.tensor([[299, 0], [7, 7]], device=CUDA)
    assert torch.equal(w.rows(ids, torch.float32).cpu(), ref[ids.cpu()])


@pytest.mark.parametrize("type_name", sorted(BLOCK_TYPES))
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_qlinear_paths(type_name: str, rows: int):
    w, ref = _weight(type_name, seed=rows)
    x = torch.randn(rows, w.shape[1], device=CUDA).bfloat16()
    bound = MATVEC_BOUND if rows <= quant_kernels.matvec_max_rows(type_name) else PREFILL_BOUND
    _assert_within(qlinear(x, w), x, ref, bound)
    if rows == 1:   # the same through split K with a bias
        bias = torch.randn(OUT, device=CUDA).bfloat16()
        got = quant_kernels.qmatvec(x, w, bias, split=3, chunks_per_step=1) - bias
        _assert_within(got, x, ref, 2 * MATVEC_BOUND)
        _assert_within(quant_kernels.qmatvec(x, w, paired=False), x, ref, MATVEC_BOUND)


@pytest.mark.parametrize("type_name", ["Q5_0", "Q8_0", "Q4_0", "Q5_1", "Q4_1"])
@pytest.mark.parametrize("out", [300, 3072])
def test_short_rows_at_one_row_of_x(type_name: str, out: int):
    """SmolLM2's width (576: 2.25 chunks) in one four-chunk step, four warps a program over few
    rows, one over many (quant_kernels.launch_for)."""
    raw = torch.from_numpy(random_blocks(type_name, out, 576, out).copy())
    ref = dequantize_raw(raw, type_name, (out, 576))
    w = QuantWeight.from_gguf(raw, type_name, (out, 576), CUDA)
    x = torch.randn(1, 576, device=CUDA).bfloat16()
    assert quant_kernels.launch_for(type_name, out, 576, 1)[1] == quant_kernels.SHORT_K_CHUNKS
    _assert_within(qlinear(x, w), x, ref, MATVEC_BOUND)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q8_0"])
def test_fused_prefill_kernel(type_name: str):
    w, ref = _weight(type_name, seed=3)
    x = torch.randn(130, w.shape[1], device=CUDA).bfloat16()
    _assert_within(quant_kernels.qmatmul_fused(x, w), x, ref, PREFILL_BOUND)


def test_cuda_graph_capture_and_replay():
    """Decode, batch and prefill shapes and embedding rows, captured once, replayed on new
    inputs and ids: the same results as eager calls."""
    weights = [_weight("Q4_K")[0], _weight("Q6_K", 1)[0], _weight("Q4_0", 2)[0]]
    xs = [torch.randn(m, w.shape[1], device=CUDA).bfloat16() for w in weights for m in (1, 8, 24)]
    pairs = [(x, w) for x, w in zip(xs, [w for w in weights for _ in range(3)])]
    ids = torch.tensor([[5, 299]], device=CUDA)
    embed = [_weight(name, 4)[0] for name in ("Q4_K", "Q6_K", "Q2_K", "Q8_0")]   # rows() of each decoder family
    for x, w in pairs:   # warm up: compile outside capture
        qlinear(x, w)
    for w in embed:
        w.rows(ids, torch.bfloat16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [qlinear(x, w) for x, w in pairs]
        looked_up = [w.rows(ids, torch.bfloat16) for w in embed]
    for step in range(2):
        for x, _ in pairs:
            x.copy_(torch.randn_like(x))
        ids.copy_(torch.tensor([[step, 298 - step]], device=CUDA))
        graph.replay()
        torch.cuda.synchronize()
        for (x, w), out in zip(pairs, outs):
            assert torch.equal(out, qlinear(x, w))
        for w, rows in zip(embed, looked_up):
            assert torch.equal(rows, w.rows(ids, torch.bfloat16))
