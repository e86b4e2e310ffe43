"""The integer-dot matvec (engines/torch/kernels/quant_dp4a.py) through Triton's
interpreter, dp4a emulated bytewise: its x quantization is ggml's quantize_row_q8_1
(round half away from zero, scale amax/127, the block's scaled sum) plus the sums
of each 16, and for every type it serves (Q4_K, Q6_K, Q4_0, Q8_0) its product is
exactly the float product of the weight with x as quantized, up to float32
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


def weight(type_name: str, rows: int, cols: int, seed: int) -> tuple[QuantWeight, torch.Tensor]:
    raw = random_blocks(type_name, rows, cols, seed)
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).copy())
    return QuantWeight.from_gguf(torch.from_numpy(raw.copy()), type_name, (rows, cols), "cpu"), ref


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
    q, dx, sx, s16 = quant_dp4a.quantize_x(x)
    want_q, want_d = q8_1_reference(x)
    assert torch.equal(q, want_q)
    assert torch.allclose(dx, want_d, rtol=1e-6, atol=0)
    assert torch.allclose(sx, want_d * want_q.reshape(-1, 32).float().sum(dim=1), rtol=1e-5, atol=1e-7)
    assert torch.equal(s16, want_q.reshape(-1, 16).sum(dim=1).to(torch.int32))


# Rows ragged for the block (the tail's loads clamped, its stores masked); blocks ragged
# for the step (768 = 3 super-blocks by steps of 2: the last step half past the row; 96 =
# 3 blocks of 32 by steps of 2); an unrolled loop.
CASES = [("Q4_K", 5, 512, (1, 2, 1)), ("Q4_K", 5, 512, (1, 2, 1), 3), ("Q6_K", 4, 512, (2, 1, 1), 8),
         ("Q4_0", 5, 96, (1, 2, 1), 2), ("Q8_0", 3, 64, (2, 1, 2), 5), ("Q4_K", 6, 768, (4, 2, 1)), ("Q4_K", 3, 512, (2, 1, 2)),
         ("Q6_K", 5, 512, (1, 2, 1)), ("Q6_K", 6, 768, (4, 2, 2)),
         ("Q4_0", 5, 96, (1, 2, 1)), ("Q4_0", 7, 256, (4, 4, 2)),
         ("Q8_0", 5, 96, (1, 2, 1)), ("Q8_0", 7, 256, (4, 4, 2))]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_the_integer_dot_matvec_is_the_weight_times_x_as_quantized(case):
    """Up to 8 rows of x (decode's batch; 3 and 5 ragged for the power-of-two tile)."""
    type_name, rows, cols, launch, xrows = case if len(case) == 5 else (*case, 1)
    w, ref = weight(type_name, rows, cols, seed=rows)
    x = torch.randn(xrows, cols)
    block_n, step, unroll = launch
    got = quant_dp4a.qmatvec_dp4a(x, w, block_n=block_n, blocks_per_step=step, unroll=unroll)
    q, d = q8_1_reference(x)
    x_as_quantized = (q.float().reshape(-1, 32) * d[:, None]).reshape(xrows, cols)
    want = x_as_quantized @ ref.t()
    scale = x_as_quantized.abs() @ ref.abs().t()
    assert got.shape == (xrows, rows)
    assert torch.all((got - want).abs() <= 3e-5 * scale + 1e-6), (got - want).abs().max()
    # against x itself: x's rounding (half a step of amax/127 per weight) is the whole error
    exact = x @ ref.t()
    step_error = (d.repeat_interleave(32).reshape(xrows, cols) / 2) @ ref.abs().t()
    assert torch.all((got - exact).abs() <= step_error * 1.001 + 3e-5 * scale + 1e-6)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("type_name", sorted(quant_dp4a.TYPES))
def test_the_launch_chosen_for_one_row_of_x_is_exact_too(type_name):
    """Batch-1 decode's launch (one weight row a program) on a weight of ragged rows and steps."""
    cols = 768 if quant_dp4a.TYPES[type_name] == 256 else 160
    w, ref = weight(type_name, 5, cols, seed=11)
    x = torch.randn(1, cols)
    got = quant_dp4a.qmatvec_dp4a(x, w)
    q, d = q8_1_reference(x)
    x_as_quantized = (q.float().reshape(-1, 32) * d[:, None]).reshape(1, cols)
    scale = x_as_quantized.abs() @ ref.abs().t()
    assert torch.all((got - x_as_quantized @ ref.t()).abs() <= 3e-5 * scale + 1e-6)


def test_routing_follows_the_sweep():
    """4096-row weights take dp4a at one row of x (one weight row a program fills the SMs);
    at two rows the per-type thresholds hold; 1024-row ones keep the float matvec."""
    assert quant_dp4a.launch_for("Q4_K", 1, 14336)[0] == 1
    assert quant_dp4a.launch_for("Q4_K", 8, 14336) == quant_dp4a.LAUNCH["Q4_K"]
    assert quant_dp4a.launch_for("Q6_K", 1, 128256) == quant_dp4a.LAUNCH["Q6_K"]      # the head: not swept
    for type_name in quant_dp4a.TYPES:
        assert quant_dp4a.min_rows(type_name, 1) == 4096
        assert quant_dp4a.min_rows(type_name, 2) == quant_dp4a.MIN_ROWS[type_name]
        assert quant_dp4a.min_rows(type_name, 8) == quant_dp4a.BATCH_MIN_ROWS


def test_it_refuses_what_it_does_not_serve():
    w, _ = weight("Q4_K", 2, 256, seed=0)
    with pytest.raises(ValueError, match="1 to 8 rows of x"):
        quant_dp4a.qmatvec_dp4a(torch.randn(9, 256), w)
    assert not quant_dp4a.supports(QuantWeight("Q5_K", (2, 256), {}), 1)
    assert not quant_dp4a.supports(QuantWeight("Q4_0", (2, 48), {}), 1)


def test_only_nvidia_gpus_with_dp4a_take_the_path(monkeypatch):
    """PTX dp4a exists from sm_61; a ROCm build of torch (device type "cuda" there too) runs
    Triton without PTX: both keep the float matvec instead of failing to compile."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(quant_dp4a, "_cuda_has_dp4a", lambda index: True)
    monkeypatch.setattr(torch.version, "hip", None)
    assert quant_dp4a.device_has_dp4a(cuda)
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert not quant_dp4a.device_has_dp4a(cuda)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(quant_dp4a, "_cuda_has_dp4a", lambda index: False)    # a Maxwell card
    assert not quant_dp4a.device_has_dp4a(cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not quant_dp4a.device_has_dp4a(torch.device("cpu"))
