"""The Q4_K integer-dot matvec (engines/torch/kernels/quant_dp4a.py) through Triton's
interpreter, dp4a emulated bytewise: its x quantization is ggml's quantize_row_q8_1
(round half away from zero, scale amax/127, the block's scaled sum), and its product
is exactly the float product of the weight with x as quantized, up to float32
summation order; against the unquantized x it errs by x's int8 rounding only.
The dp4a instruction itself runs in tests/gpu (test_quant_dp4a_gpu.py)."""
from __future__ import annotations

import os

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.torch.kernels import quant_dp4a  # noqa: E402
from engines.torch.kernels.quant_weight import QuantWeight  # noqa: E402
from tests.engines.quant_blocks import random_blocks  # noqa: E402


def q4k_weight(rows: int, cols: int, seed: int) -> tuple[QuantWeight, torch.Tensor]:
    raw = random_blocks("Q4_K", rows, cols, seed)
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_K).reshape(rows, cols).copy())
    return QuantWeight.from_gguf(torch.from_numpy(raw.copy()), "Q4_K", (rows, cols), "cpu"), ref


def q8_1_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's quantize_row_q8_1 in torch: (int8 per weight, scale per 32)."""
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1) / 127.0
    scaled = blocks * torch.where(d > 0, 1.0 / d, torch.zeros_like(d))[:, None]
    q = torch.where(scaled >= 0, torch.floor(scaled + 0.5), torch.ceil(scaled - 0.5))
    return q.to(torch.int8).reshape(-1), d


def test_x_is_quantized_as_ggml_quantizes_q8_1():
    x = torch.randn(512) * 3
    x[:32] = 0.0                                           # an all-zero block: scale 0, quants 0
    q, dx, sx = quant_dp4a.quantize_x(x)
    want_q, want_d = q8_1_reference(x)
    assert torch.equal(q, want_q)
    assert torch.allclose(dx, want_d, rtol=1e-6, atol=0)
    assert torch.allclose(sx, want_d * want_q.reshape(-1, 32).float().sum(dim=1), rtol=1e-5, atol=1e-7)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("rows,cols,block_n,step", [(5, 512, 1, 2), (6, 768, 4, 2), (3, 256, 2, 1)])
def test_the_integer_dot_matvec_is_the_weight_times_x_as_quantized(rows, cols, block_n, step):
    """Rows ragged for the block (the tail's loads clamped, its stores masked), super-blocks
    ragged for the step (768 = 3 super-blocks by steps of 2: the last step half past the row)."""
    w, ref = q4k_weight(rows, cols, seed=rows)
    x = torch.randn(1, cols)
    got = quant_dp4a.qmatvec_q4k_dp4a(x, w, block_n=block_n, super_blocks_per_step=step)
    q, d = q8_1_reference(x)
    x_as_quantized = (q.float().reshape(-1, 32) * d[:, None]).reshape(1, cols)
    want = x_as_quantized @ ref.t()
    scale = x_as_quantized.abs() @ ref.abs().t()
    assert got.shape == (1, rows)
    assert torch.all((got - want).abs() <= 3e-5 * scale + 1e-6), (got - want).abs().max()
    # against x itself: x's rounding (half a step of amax/127 per weight) is the whole error
    exact = x @ ref.t()
    step_error = (d.repeat_interleave(32)[None, :] / 2) @ ref.abs().t()
    assert torch.all((got - exact).abs() <= step_error * 1.001 + 3e-5 * scale + 1e-6)


def test_it_refuses_what_it_does_not_serve():
    w, _ = q4k_weight(2, 256, seed=0)
    with pytest.raises(ValueError, match="Q4_K at one row"):
        quant_dp4a.qmatvec_q4k_dp4a(torch.randn(2, 256), w)
    assert not quant_dp4a.supports(QuantWeight("Q6_K", (2, 256), {}), 1)
