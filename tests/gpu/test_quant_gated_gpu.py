"""The down projection reading act(gate) * up itself (engines/torch/kernels/gated_input.py) on
CUDA: the float matvec and the dp4a path against the same kernels fed the separate
activation kernel's output (fused_small.gated_activation, bf16), in and out of a CUDA
graph; and a quantized MLP's eager forward against the unfused one. Same x values (both
round act(gate) * up to bf16 once), so only the sum order differs: 2^-8 of sum |x * w|."""
from __future__ import annotations

import pytest
import torch

from engines.torch.kernels import fused_small, quant_dp4a, quant_kernels, quant_ops
from engines.torch.kernels.quant_weight import QuantWeight
from engines.torch.load.dequant import dequantize_raw
from tests.engines.quant_blocks import random_blocks

CUDA = torch.device("cuda")
BOUND = 2.0 ** -8


def weight(type_name: str, rows: int, cols: int) -> tuple[QuantWeight, torch.Tensor]:
    raw = torch.from_numpy(random_blocks(type_name, rows, cols, seed=rows).copy())
    return QuantWeight.from_gguf(raw, type_name, (rows, cols), CUDA), dequantize_raw(raw, type_name, (rows, cols))


def check(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> None:
    scale = x.float().abs().cpu() @ ref.abs().float().t()
    err = (got.float() - want.float()).abs().cpu()
    assert torch.all(err <= BOUND * scale + 1e-2), (err / (scale + 1e-2)).max()


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("type_name,rows,cols", [("Q4_K", 576, 1536), ("Q6_K", 4096, 14336), ("Q5_0", 576, 1536),
                                                 ("Q8_0", 576, 1536), ("Q4_K", 4096, 14336)])
@pytest.mark.parametrize("rows_of_x", [1, 2])
def test_gated_down_projection_equals_the_activation_kernel_then_the_matvec(type_name, rows, cols, rows_of_x, kind):
    w, ref = weight(type_name, rows, cols)
    h = torch.randn(rows_of_x, 2 * cols, device=CUDA, dtype=torch.bfloat16) * 2
    x = fused_small.gated_activation(h, kind)
    if quant_dp4a.chosen(w, rows_of_x):
        got, want = quant_dp4a.qmatvec_dp4a(h, w, gated=kind), quant_dp4a.qmatvec_dp4a(x, w)
    else:
        got, want = quant_kernels.qmatvec(h, w, gated=kind), quant_kernels.qmatvec(x, w)
    check(got, want, x, ref)
    check(quant_ops.qlinear_gated(h, w, None, kind), want, x, ref)


def test_gated_down_projection_in_a_cuda_graph():
    w, ref = weight("Q4_K", 4096, 14336)
    h = torch.randn(1, 2 * 14336, device=CUDA, dtype=torch.bfloat16)
    quant_ops.qlinear_gated(h, w, None, "silu")            # built outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_ops.qlinear_gated(h, w, None, "silu")
    h.copy_(torch.randn_like(h) * 2)
    graph.replay()
    x = fused_small.gated_activation(h, "silu")
    check(out, quant_ops.qlinear(x, w), x, ref)
    assert quant_ops._GATED_KERNELS["on"]                  # built here: no fallback taken
