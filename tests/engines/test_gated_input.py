"""The down projection reading act(gate) * up itself (engines/torch/kernels/gated_input.py),
through Triton's interpreter: the float matvec and the dp4a path's x quantization, with
the activation in their x loads, against the same kernels fed the activation computed
first (as the separate kernel wrote it, rounded to h's dtype). The values are the same up
to the activation's float32 rounding, so the bounds are tight. The GPU runs them in
tests/gpu/test_quant_gated_gpu.py."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.torch.kernels import quant_dp4a, quant_kernels, quant_ops  # noqa: E402
from engines.torch.kernels.quant_weight import QuantWeight  # noqa: E402
from engines.torch.quant.modules import QuantLinear  # noqa: E402
from tests.engines.quant_blocks import random_blocks  # noqa: E402

KINDS = ("silu", "gelu_tanh")


def act_then_round(h: torch.Tensor, kind: str) -> torch.Tensor:
    gate, up = h.float().chunk(2, dim=-1)
    act = F.silu(gate) if kind == "silu" else F.gelu(gate, approximate="tanh")
    return (act * up).to(h.dtype)


def weight(type_name: str, rows: int, cols: int, seed: int = 0) -> QuantWeight:
    raw = random_blocks(type_name, rows, cols, seed)
    return QuantWeight.from_gguf(torch.from_numpy(raw.copy()), type_name, (rows, cols), "cpu")


def gate_up(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 2 * cols, generator=gen) * 2).to(dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("type_name,cols", [("Q4_K", 512), ("Q6_K", 512), ("Q5_0", 96), ("Q8_0", 96), ("Q4_0", 64)])
@pytest.mark.parametrize("rows_of_x", [1, 3])
def test_float_matvec_reads_the_activation(type_name: str, cols: int, rows_of_x: int, kind: str) -> None:
    w = weight(type_name, 12, cols)
    h = gate_up(rows_of_x, cols, torch.float32)
    got = quant_kernels.qmatvec(h, w, gated=kind)
    want = quant_kernels.qmatvec(act_then_round(h, kind), w)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bf16_gate_up_is_rounded_as_the_separate_kernel_wrote_it() -> None:
    """Within one bf16 step of each x (the interpreter's cast to bf16 truncates where the GPU
    and torch round to nearest), as a fraction of sum |x * w| per output."""
    w = weight("Q4_K", 8, 256)
    h = gate_up(1, 256, torch.bfloat16, seed=3)
    x = act_then_round(h, "silu")
    got = quant_kernels.qmatvec(h, w, gated="silu").float()
    want = quant_kernels.qmatvec(x, w).float()
    scale = x.float().abs() @ w.dequantize(torch.float32).abs().t()
    assert torch.all((got - want).abs() <= 2 ** -7 * scale + 2e-2), (got - want).abs().max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows_of_x", [1, 2])
def test_dp4a_quantizes_the_activation(rows_of_x: int, kind: str) -> None:
    """Each row of [gate | up] becomes one row of int8 act(gate) * up, as quantize_x of the
    activation gives (a quant may move by one where torch's and Triton's float32 activation
    differ in the last bit next to a rounding boundary)."""
    cols = 512
    h = gate_up(rows_of_x, cols, torch.float32, seed=rows_of_x)
    q, dx, sx, s16 = quant_dp4a.quantize_x(h.reshape(-1), kind, cols)
    wq, wdx, wsx, ws16 = quant_dp4a.quantize_x(act_then_round(h, kind).reshape(-1))
    assert q.shape == wq.shape == (rows_of_x * cols,)
    assert (q.int() - wq.int()).abs().max() <= 1 and (q != wq).float().mean() < 1e-3
    torch.testing.assert_close(dx, wdx, rtol=1e-5, atol=0)
    w = weight("Q4_K", 8, cols)
    got = quant_dp4a.qmatvec_dp4a(h, w, gated=kind)
    want = quant_dp4a.qmatvec_dp4a(act_then_round(h, kind), w)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_qlinear_gated_off_the_gpu_is_the_activation_then_qlinear() -> None:
    w = weight("Q8_0", 6, 64)
    h = gate_up(2, 64, torch.float32)
    torch.testing.assert_close(quant_ops.qlinear_gated(h, w, None, "silu"),
                               quant_ops.qlinear(act_then_round(h, "silu"), w))
    layer = QuantLinear(w, None, torch.float32)
    torch.testing.assert_close(layer.gated(h, "gelu_tanh"), layer(act_then_round(h, "gelu_tanh")))


def test_a_kernel_that_does_not_build_falls_back_once_and_says_so(monkeypatch, caplog) -> None:
    from triton.runtime.errors import OutOfResources

    w = weight("Q8_0", 6, 64)
    h = gate_up(1, 64, torch.float32)
    calls = []

    plain = quant_ops._qlinear

    def no_build(x, w, bias, gated=None):
        if gated is None:
            return plain(x, w, bias)
        calls.append(1)
        raise OutOfResources(300000, 232448, "shared memory")

    monkeypatch.setattr(quant_ops, "_GATED_KERNELS", {"on": True})
    monkeypatch.setattr(quant_ops, "_qlinear", no_build)
    want = quant_ops.qlinear(act_then_round(h, "silu"), w)
    with caplog.at_level("WARNING"):
        torch.testing.assert_close(quant_ops.qlinear_gated(h, w, None, "silu"), want)
        torch.testing.assert_close(quant_ops.qlinear_gated(h, w, None, "silu"), want)
    assert calls == [1] and quant_ops._GATED_KERNELS["on"] is False
    assert "do not build here" in caplog.text


def test_an_unknown_activation_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="relu"):
        quant_kernels.qmatvec(gate_up(1, 64, torch.float32), weight("Q8_0", 4, 64), gated="relu")
