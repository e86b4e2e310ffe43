"""The projection after a pre-norm reading rms_norm(x + delta) itself
(engines/torch/kernels/normed_input.py), through Triton's interpreter: the float matvec
with NORM against the same kernel fed the separate add + norm's output, the residual sum
it writes, and the model-side plumbing (what a consumer without the kernel gets). The
GPU runs the kernel in tests/gpu/test_normed_input_gpu.py."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.torch.kernels import quant_dp4a, quant_kernels, quant_ops  # noqa: E402
from engines.torch.kernels.normed_input import NormedInput  # noqa: E402
from engines.torch.kernels.quant_weight import QuantWeight  # noqa: E402
from engines.torch.model.projections import linear_on  # noqa: E402
from engines.torch.quant.modules import QuantLinear  # noqa: E402
from tests.engines.quant_blocks import random_blocks  # noqa: E402


def weight(type_name: str, rows: int, cols: int, seed: int = 0) -> QuantWeight:
    raw = random_blocks(type_name, rows, cols, seed)
    return QuantWeight.from_gguf(torch.from_numpy(raw.copy()), type_name, (rows, cols), "cpu")


def stream(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A residual, an addend and a norm weight of one layer's shapes."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=gen) * 3).to(dtype)
    delta = torch.randn(rows, cols, generator=gen).to(dtype)
    g = (torch.rand(cols, generator=gen) + 0.5).to(dtype)
    return x, delta, g


def add_then_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, g: torch.Tensor,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = x if delta is None else (x.float() + delta.float()).to(x.dtype)
    sf = s.float()
    normed = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * g.float()
    return s, normed


@pytest.mark.parametrize("type_name,cols", [("Q4_K", 512), ("Q6_K", 256), ("Q5_0", 576), ("Q8_0", 96),
                                            ("Q4_0", 64), ("Q3_K", 256)])
@pytest.mark.parametrize("rows_of_x", [1, 3])
@pytest.mark.parametrize("with_delta", [True, False])
def test_float_matvec_reads_the_norm_of_the_sum(type_name: str, cols: int, rows_of_x: int, with_delta: bool) -> None:
    w = weight(type_name, 12, cols)
    x, delta, g = stream(rows_of_x, cols, torch.float32, seed=rows_of_x)
    delta = delta if with_delta else None
    h = NormedInput(x, delta, g, 1e-5)
    got = quant_kernels.qmatvec(h, w)
    s, normed = add_then_norm_reference(x, delta, g, 1e-5)
    torch.testing.assert_close(got, quant_kernels.qmatvec(normed, w), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.sum, s, rtol=0, atol=0)


def test_bf16_within_one_rounding_of_x_and_the_sum_bit_exact() -> None:
    """The kernel keeps x = s * g * rstd in float32 where the separate norm rounds it to bf16:
    within 2^-8 of sum |x * w| per output. The residual it writes is the rounded sum itself
    (the interpreter's bf16 cast truncates where torch rounds: within one bf16 step here;
    tests/gpu/test_normed_input_gpu.py checks it bit-exact)."""
    w = weight("Q4_K", 16, 256)
    x, delta, g = stream(1, 256, torch.bfloat16, seed=4)
    h = NormedInput(x, delta, g, 1e-6)
    got = quant_kernels.qmatvec(h, w).float()
    s, normed = add_then_norm_reference(x, delta, g, 1e-6)
    want = quant_kernels.qmatvec(normed, w).float()
    scale = normed.abs() @ w.dequantize(torch.float32).abs().t()
    assert torch.all((got - want).abs() <= 2 ** -8 * scale + 2e-2), (got - want).abs().max()
    one_step = 2.0 ** -7 * s.float().abs()
    assert torch.all((h.sum.float() - s.float()).abs() <= one_step)


def test_bias_is_added_after_the_norm_scale() -> None:
    w = weight("Q8_0", 8, 64)
    x, delta, g = stream(1, 64, torch.float32)
    bias = torch.linspace(-1, 1, 8)
    _, normed = add_then_norm_reference(x, delta, g, 1e-5)
    torch.testing.assert_close(quant_kernels.qmatvec(NormedInput(x, delta, g, 1e-5), w, bias),
                               quant_kernels.qmatvec(normed, w, bias), rtol=1e-4, atol=1e-4)


def test_materialize_once_writes_the_sum_and_serves_every_consumer() -> None:
    x, delta, g = stream(2, 64, torch.float32)
    h = NormedInput(x, delta, g, 1e-5)
    first = h.materialize()
    s, normed = add_then_norm_reference(x, delta, g, 1e-5)
    torch.testing.assert_close(first, normed.to(x.dtype))
    assert h.materialize() is first
    torch.testing.assert_close(h.sum, s)


def test_a_plain_linear_gets_the_materialized_input() -> None:
    x, delta, g = stream(2, 32, torch.float32)
    linear = torch.nn.Linear(32, 5)
    h = NormedInput(x.view(1, 2, 32), delta.view(1, 2, 32), g, 1e-5)
    _, normed = add_then_norm_reference(x, delta, g, 1e-5)
    torch.testing.assert_close(linear_on(linear, h), linear(normed.view(1, 2, 32)))
    assert torch.equal(linear_on(linear, normed), linear(normed))


def test_qlinear_normed_off_the_kernel_is_the_norm_then_qlinear() -> None:
    """On the CPU (no CUDA tensors) qlinear_normed takes the reference path on h."""
    w = weight("Q8_0", 6, 64)
    x, delta, g = stream(2, 64, torch.float32)
    h = NormedInput(x, delta, g, 1e-5)
    layer = QuantLinear(w, None, torch.float32)
    _, normed = add_then_norm_reference(x, delta, g, 1e-5)
    torch.testing.assert_close(quant_ops.qlinear_normed(h, w, None), quant_ops.qlinear(normed, w))
    torch.testing.assert_close(layer.normed(h), layer(normed))


def test_mismatched_addend_is_refused_by_shape() -> None:
    x, delta, g = stream(2, 64, torch.float32)
    with pytest.raises(ValueError, match="differ"):
        NormedInput(x, delta[:1], g, 1e-5)


@pytest.mark.parametrize("rows_of_x", [1, 2])
@pytest.mark.parametrize("with_delta", [True, False])
def test_dp4a_quantizes_the_norm_of_the_sum(rows_of_x: int, with_delta: bool) -> None:
    """The dp4a path's x quantization reads the norm itself: the same int8 rows as quantizing
    the separate norm's float32 output (a quant may move by one next to a rounding boundary,
    the two sums of squares being added in different orders), and the residual written."""
    cols = 512
    x, delta, g = stream(rows_of_x, cols, torch.float32, seed=7 + rows_of_x)
    delta = delta if with_delta else None
    h = NormedInput(x, delta, g, 1e-5)
    s, normed = add_then_norm_reference(x, delta, g, 1e-5)
    q, dx, _, _ = quant_dp4a.quantize_x(h)
    wq, wdx, _, _ = quant_dp4a.quantize_x(normed.reshape(-1))
    assert (q.int() - wq.int()).abs().max() <= 1 and (q != wq).float().mean() < 1e-2
    torch.testing.assert_close(dx, wdx, rtol=1e-5, atol=0)
    torch.testing.assert_close(h.sum, s, rtol=0, atol=0)
    w = weight("Q4_K", 8, cols)
    want = quant_dp4a.qmatvec_dp4a(normed, w)
    torch.testing.assert_close(quant_dp4a.qmatvec_dp4a(NormedInput(x, delta, g, 1e-5), w), want,
                               rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_dp4a_refuses_a_width_its_programs_would_straddle() -> None:
    x, delta, g = stream(1, 96, torch.float32)
    with pytest.raises(ValueError, match="whole programs"):
        quant_dp4a.quantize_x(NormedInput(x, delta, g, 1e-5))
    assert quant_dp4a.takes_normed(4096) and not quant_dp4a.takes_normed(576)


def test_a_model_with_deferred_norms_computes_what_it_did(monkeypatch) -> None:
    """The layers' plumbing: with the fused norms 'usable' (as on the GPU; here their kernels
    run in the interpreter), each norm reaches its projections deferred, the plain Linears of
    a float model materialize it, and the residual stream each sum continues from is the one
    the separate adds gave: the logits equal the torch ops' within float32 rounding."""
    from engines.torch.kernels import fused_small
    from engines.torch.model.attention import ContiguousKV
    from engines.torch.model.model import build_model
    from tests.engines.tiny_gguf import TINY, random_state

    cfg = TINY.replace(vocab_size=300, dim=128, num_heads=4, num_kv_heads=2, head_dim=32, ffn_dim=256)
    model = build_model(cfg, random_state(cfg), "cpu", torch.float32)
    ids, positions = torch.tensor([[5, 9, 77, 3]]), torch.arange(4).unsqueeze(0)

    def logits() -> torch.Tensor:
        kv = ContiguousKV(cfg.num_layers, 1, cfg.num_kv_heads, 4, cfg.head_dim, torch.float32)
        return model(ids, positions, kv)

    want = logits()
    made = []
    monkeypatch.setattr(fused_small, "usable", lambda x: True)
    monkeypatch.setattr(NormedInput, "materialize",
                        lambda self, plain=NormedInput.materialize: made.append(1) or plain(self))
    got = logits()
    assert made, "no norm was deferred"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
