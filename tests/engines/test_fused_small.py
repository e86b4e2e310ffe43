"""The one-launch RMSNorm and gated activation (engines/torch/kernels/fused_small.py)
through Triton's interpreter, against the torch ops the model runs where they do not
apply (norms.RMSNorm, mlp.MLP): the same float32 math, so within float32 summation
order before the final rounding to the activations' dtype. The GPU runs them in
tests/gpu/test_fused_small_gpu.py."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.torch.kernels import fused_small  # noqa: E402
from engines.torch.model.norms import RMSNorm  # noqa: E402


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], eps)
    norm.weight.data = weight
    assert not fused_small.usable(x)   # the CPU keeps the torch ops
    return norm(x)


@pytest.mark.parametrize("cols", [64, 576, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_torch_ops(cols: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(cols)
    x = (torch.randn(2, 3, cols, generator=gen) * 4).to(dtype)
    weight = torch.randn(cols, generator=gen)
    got = fused_small.rms_norm(x, weight, 1e-6)
    want = torch_rms_norm(x, weight, 1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    # float32 inside both; bf16 output: one rounding step apart at most
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_rms_norm_reads_strided_rows() -> None:
    """A slice of a wider tensor (a non-contiguous row stride) is normed in place of a copy."""
    wide = torch.randn(4, 256)
    x = wide[:, :128]
    weight = torch.ones(128)
    torch.testing.assert_close(fused_small.rms_norm(x, weight, 1e-5), torch_rms_norm(x.clone(), weight, 1e-5))


@pytest.mark.parametrize("cols", [64, 576, 1000])
def test_add_rms_norm_is_the_add_then_the_norm(cols: int) -> None:
    """float32 residual: the sum exactly torch's add, the norm within float32 summation order."""
    gen = torch.Generator().manual_seed(cols)
    x, delta = torch.randn(3, 1, cols, generator=gen) * 4, torch.randn(3, 1, cols, generator=gen)
    weight = torch.randn(cols, generator=gen)
    total, normed = fused_small.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(normed, torch_rms_norm(x + delta, weight, 1e-6), rtol=1e-5, atol=1e-5)


def test_add_rms_norm_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="addend"):
        fused_small.add_rms_norm(torch.zeros(2, 8), torch.zeros(1, 8), torch.ones(8), 1e-6)


def test_add_then_norm_keeps_the_torch_ops_off_the_gpu() -> None:
    """On the CPU (and for LayerNorm anywhere) it is the add, then the module."""
    from engines.torch.model.norms import LayerNorm, add_then_norm

    x, delta = torch.randn(2, 16), torch.randn(2, 16)
    for norm in (RMSNorm(16, 1e-6), LayerNorm(16, 1e-5)):
        total, normed = add_then_norm(norm, x, delta)
        assert torch.equal(total, x + delta) and torch.equal(normed, norm(x + delta))


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("cols", [96, 1536, 2500])
def test_gated_activation_matches_the_torch_ops(kind: str, cols: int) -> None:
    gen = torch.Generator().manual_seed(cols)
    h = torch.randn(3, 1, 2 * cols, generator=gen) * 3
    gate, up = h.chunk(2, dim=-1)
    act = F.silu if kind == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    got = fused_small.gated_activation(h, kind)
    assert got.shape == (3, 1, cols)
    torch.testing.assert_close(got, act(gate) * up, rtol=1e-5, atol=1e-5)


def test_gated_activation_rounds_once_in_bf16() -> None:
    """bf16 in, float32 inside: within one bf16 step of the float32 result (the
    interpreter's cast to bf16 truncates where the GPU rounds to nearest)."""
    h = torch.randn(2, 2 * 300).to(torch.bfloat16)
    gate, up = h.float().chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = fused_small.gated_activation(h, "silu")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-6)


def test_an_unknown_activation_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="relu"):
        fused_small.gated_activation(torch.zeros(1, 8), "relu")


def test_rows_too_wide_for_one_program_keep_the_torch_ops() -> None:
    assert not fused_small.usable(torch.zeros(1, fused_small.MAX_COLS + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_pair_is_both_norms_in_one_launch(dtype: torch.dtype) -> None:
    """Qwen3's per-head q and k norms: q's 4 heads and k's 2 (a slice of one projection's
    output, as Attention.project splits it), each with its own weight."""
    gen = torch.Generator().manual_seed(7)
    qkv = (torch.randn(1, 1, 4 * 64 + 2 * 64 + 2 * 64, generator=gen) * 3).to(dtype)
    q, k, _ = qkv.split([256, 128, 128], dim=-1)
    q, k = q.reshape(1, 1, 4, 64), k.reshape(1, 1, 2, 64)
    wq, wk = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    got_q, got_k = fused_small.rms_norm_pair(q, wq, k, wk, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert got_q.shape == q.shape and got_k.shape == k.shape and got_q.dtype == dtype
    torch.testing.assert_close(got_q.float(), torch_rms_norm(q, wq, 1e-6).float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_k.float(), torch_rms_norm(k, wk, 1e-6).float(), rtol=tol, atol=tol)


def test_rms_norm_pair_refuses_rows_of_two_widths() -> None:
    with pytest.raises(ValueError, match="not one width"):
        fused_small.rms_norm_pair(torch.randn(2, 64), torch.ones(64), torch.randn(2, 32), torch.ones(32), 1e-6)
