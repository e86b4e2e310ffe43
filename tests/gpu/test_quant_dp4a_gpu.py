"""The integer-dot matvec (Q4_K, Q6_K, Q4_0, Q8_0) on CUDA (the real dp4a instruction), against the torch
decoders' weight times x as quantized to q8_1, on a 300-row weight (ragged for any
block of rows) and an 8B-shaped one, in a CUDA graph replayed on new x as decode runs it.
Bound: the float32 sum order and the output's bf16 rounding, 2^-8 of sum |x_q * w|."""
from __future__ import annotations

import pytest
import torch

from engines.torch.kernels import quant_dp4a
from engines.torch.kernels.quant_weight import QuantWeight
from engines.torch.load.dequant import dequantize_raw
from tests.engines.quant_blocks import random_blocks

CUDA = torch.device("cuda")
BOUND = 2.0 ** -8


def _q8_1(x: torch.Tensor) -> torch.Tensor:
    """x as quantize_row_q8_1 leaves it, in float32 (on the CPU)."""
    blocks = x.float().cpu().reshape(-1, 32)
    d = blocks.abs().amax(dim=1) / 127.0
    scaled = blocks * torch.where(d > 0, 1.0 / d, torch.zeros_like(d))[:, None]
    q = torch.where(scaled >= 0, torch.floor(scaled + 0.5), torch.ceil(scaled - 0.5))
    return (q * d[:, None]).reshape(x.shape[0], -1)


def _check(got: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> None:
    xq = _q8_1(x)
    want, scale = xq @ ref.t(), xq.abs() @ ref.abs().t()
    err = (got.float().cpu() - want).abs()
    assert torch.all(err <= BOUND * scale + 1e-3), (err / (scale + 1e-3)).max()


@pytest.mark.parametrize("type_name", sorted(quant_dp4a.TYPES))
@pytest.mark.parametrize("rows,cols", [(300, 1024), (1024, 4096)])
def test_dp4a_matvec_matches_the_weight_times_quantized_x(type_name, rows, cols):
    raw = torch.from_numpy(random_blocks(type_name, rows, cols, seed=rows).copy())
    ref = dequantize_raw(raw, type_name, (rows, cols))
    w = QuantWeight.from_gguf(raw, type_name, (rows, cols), CUDA)
    assert not quant_dp4a.emulated()
    x = torch.randn(1, cols, device=CUDA, dtype=torch.bfloat16)
    _check(quant_dp4a.qmatvec_dp4a(x, w), x, ref)
    for block_n, step, unroll, warps in ((1, 1, 1, 1), (8, 4, 1, 4), (4, 2, 2, 1)):
        _check(quant_dp4a.qmatvec_dp4a(x, w, block_n=block_n, blocks_per_step=step, unroll=unroll,
                                       num_warps=warps), x, ref)
    for rows_of_x in (2, 3, 8):     # decode's batch: the weights read once for every row
        xs = torch.randn(rows_of_x, cols, device=CUDA, dtype=torch.bfloat16)
        _check(quant_dp4a.qmatvec_dp4a(xs, w), xs, ref)
    # captured, replayed on new inputs (decode's CUDA graphs)
    static_x = x.clone()
    quant_dp4a.qmatvec_dp4a(static_x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = quant_dp4a.qmatvec_dp4a(static_x, w)
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    graph.replay()
    _check(static_y, fresh, ref)
