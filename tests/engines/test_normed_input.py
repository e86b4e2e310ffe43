"""A projection doing the residual add and RMSNorm before it in its x loads
(engines/torch/kernels/normed_input.py), through Triton's interpreter: the float matvec
fed residual + addend against the same kernel fed the norm computed first, as the norm
kernel writes it; the stored residual against torch's add. The GPU runs them in
tests/gpu/test_normed_input_gpu.py; off the GPU the model norms first (the fallback below)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.torch.kernels import quant_kernels, quant_ops  # noqa: E402
from engines.torch.kernels.normed_input import MAX_NORMED_K, PendingNorm  # noqa: E402
from engines.torch.model.norms import NormAhead, RMSNorm, add_then_norm  # noqa: E402
from engines.torch.quant.modules import QuantLinear  # noqa: E402
from tests.engines.test_gated_input import weight  # noqa: E402

EPS = 1e-5


def stream(cols: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(residual, addend, norm weight) of one row."""
    gen = torch.Generator().manual_seed(seed)
    residual = (torch.randn(1, cols, generator=gen) * 3).to(dtype)
    addend = torch.randn(1, cols, generator=gen).to(dtype)
    norm_weight = (1 + 0.5 * torch.randn(cols, generator=gen)).to(dtype)
    return residual, addend, norm_weight


def norm_first(residual, addend, norm_weight) -> tuple[torch.Tensor, torch.Tensor]:
    norm = RMSNorm(residual.shape[-1], EPS)
    norm.weight = torch.nn.Parameter(norm_weight, requires_grad=False)
    return add_then_norm(norm, residual, addend)


@pytest.mark.parametrize("type_name,cols", [("Q4_K", 512), ("Q6_K", 512), ("Q5_0", 576), ("Q8_0", 576),
                                            ("Q4_0", 64)])
def test_the_matvec_reads_the_norm_of_the_sum(type_name: str, cols: int) -> None:
    w = weight(type_name, 12, cols)
    residual, addend, norm_weight = stream(cols, torch.float32, seed=cols)
    pending = PendingNorm(residual, addend, norm_weight, EPS)
    got = quant_kernels.qmatvec(residual, w, norm=pending)
    total, h = norm_first(residual, addend, norm_weight)
    torch.testing.assert_close(pending.total, total)
    torch.testing.assert_close(got, quant_kernels.qmatvec(h, w), rtol=1e-4, atol=1e-4)


def test_bf16_stream_is_rounded_as_the_norm_kernel_wrote_it() -> None:
    """Within one bf16 step of each x (the interpreter's cast to bf16 truncates where the GPU
    rounds to nearest), as a fraction of sum |x * w| per output."""
    w = weight("Q4_K", 8, 512)
    residual, addend, norm_weight = stream(512, torch.bfloat16, seed=5)
    pending = PendingNorm(residual, addend, norm_weight, EPS)
    got = quant_kernels.qmatvec(residual, w, norm=pending).float()
    total, h = norm_first(residual, addend, norm_weight)
    assert (pending.total.float() - total.float()).abs().max() <= 2 ** -7 * total.float().abs().max()
    want = quant_kernels.qmatvec(h, w).float()
    scale = h.float().abs() @ w.dequantize(torch.float32).abs().t()
    assert torch.all((got - want).abs() <= 2 ** -7 * scale + 2e-2), (got - want).abs().max()


def test_only_one_row_of_a_short_stream_fits() -> None:
    residual, addend, norm_weight = stream(64, torch.float32, seed=1)
    assert PendingNorm(residual, addend, norm_weight, EPS).fits(1)
    assert not PendingNorm(residual, addend, norm_weight, EPS).fits(2)
    wide = stream(MAX_NORMED_K + 256, torch.float32, seed=2)
    assert not PendingNorm(*wide, EPS).fits(1)
    with pytest.raises(ValueError, match="one row"):
        quant_kernels.qmatvec(residual.expand(2, -1), weight("Q8_0", 4, 64),
                              norm=PendingNorm(residual.expand(2, -1), addend.expand(2, -1), norm_weight, EPS))


def test_off_the_gpu_the_model_norms_first_and_keeps_the_residual() -> None:
    """QuantLinear.normed declines on the CPU (None); NormAhead then norms, projects, and
    hands the layer residual + addend."""
    w = weight("Q8_0", 6, 64)
    layer = QuantLinear(w, None, torch.float32)
    residual, addend, norm_weight = stream(64, torch.float32, seed=3)
    norm = RMSNorm(64, EPS)
    norm.weight = torch.nn.Parameter(norm_weight, requires_grad=False)
    assert layer.normed(PendingNorm(residual, addend, norm_weight, EPS)) is None
    assert quant_ops.qlinear_normed(PendingNorm(residual, addend, norm_weight, EPS), w, None) is None
    ahead = NormAhead(norm, residual, addend)
    total, h = add_then_norm(norm, residual, addend)
    torch.testing.assert_close(ahead.project(layer), layer(h))
    torch.testing.assert_close(ahead.residual(), total)


def test_without_an_addend_the_stream_is_the_input() -> None:
    norm = RMSNorm(8, EPS)
    x = torch.randn(1, 1, 8)
    ahead = NormAhead(norm, x, None)
    assert ahead.residual() is x
    torch.testing.assert_close(ahead.value(), norm(x))
