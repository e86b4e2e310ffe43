"""A projection doing the residual add and RMSNorm before it in its x loads
(engines/torch/kernels/normed_input.py) on CUDA: the float matvec against the same kernel
fed fused_small.add_rms_norm's output, in and out of a CUDA graph, and a quantized
model's eager one-token step (where layers hand their norms to q/k/v and gate/up) against
the same step with the prologue off. Same x values but for the order of the sum of
squares (one float32 rounding of the norm's scale): 2^-7 of sum |x * w|."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engines.torch.kernels import fused_small, quant_kernels, quant_ops
from engines.torch.kernels.normed_input import PendingNorm
from tests.gpu.test_quant_gated_gpu import CUDA, weight

gguf = pytest.importorskip("gguf")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "engines"))
from tiny_gguf import TINY, random_state, write_tiny_gguf  # noqa: E402

EPS = 1e-6
BOUND = 2.0 ** -7


def stream(cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    residual = torch.randn(1, cols, device=CUDA, dtype=torch.bfloat16) * 3
    addend = torch.randn(1, cols, device=CUDA, dtype=torch.bfloat16)
    norm_weight = (1 + 0.5 * torch.randn(cols, device=CUDA)).to(torch.bfloat16)
    return residual, addend, norm_weight


def check(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> None:
    scale = x.float().abs().cpu() @ ref.abs().float().t()
    err = (got.float() - want.float()).abs().cpu()
    assert torch.all(err <= BOUND * scale + 1e-2), (err / (scale + 1e-2)).max()


@pytest.mark.parametrize("type_name,rows,cols", [("Q5_0", 960, 576), ("Q8_0", 3072, 576), ("Q4_K", 2048, 2048),
                                                 ("Q6_K", 1536, 1536), ("Q4_0", 4096, 2048)])
def test_normed_projection_equals_add_rms_norm_then_the_matvec(type_name, rows, cols):
    w, ref = weight(type_name, rows, cols)
    residual, addend, norm_weight = stream(cols)
    pending = PendingNorm(residual, addend, norm_weight, EPS)
    got = quant_kernels.qmatvec(residual, w, norm=pending)
    total, h = fused_small.add_rms_norm(residual, addend, norm_weight, EPS)
    assert torch.equal(pending.total, total)                  # the stream: bf16(residual + addend), as torch adds
    check(got, quant_kernels.qmatvec(h, w), h, ref)


def test_normed_projection_in_a_cuda_graph():
    w, ref = weight("Q5_0", 960, 576)
    residual, addend, norm_weight = stream(576)
    pending = PendingNorm(residual, addend, norm_weight, EPS)
    assert quant_ops.qlinear_normed(pending, w, None) is not None     # built outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_ops.qlinear_normed(pending, w, None)
    residual.copy_(torch.randn_like(residual))
    addend.copy_(torch.randn_like(addend))
    graph.replay()
    total, h = fused_small.add_rms_norm(residual, addend, norm_weight, EPS)
    assert torch.equal(pending.total, total)
    check(out, quant_kernels.qmatvec(h, w), h, ref)
    assert quant_ops._PROLOGUE_KERNELS["normed"]                       # built here: no fallback taken


def test_a_quantized_models_eager_step_takes_its_norms_in_the_projections(tmp_path, monkeypatch):
    from engines.torch.load.gguf_loader import load_gguf
    from engines.torch.model.attention import ContiguousKV

    cfg = TINY.replace(dim=576, ffn_dim=1536, num_layers=3, num_heads=9, num_kv_heads=3)
    path = write_tiny_gguf(tmp_path / "q8.gguf", cfg, random_state(cfg, seed=5), qtype=gguf.GGMLQuantizationType.Q8_0)
    model, _ = load_gguf(path, "cuda", torch.bfloat16)
    ids = list(range(30, 50))

    def step() -> torch.Tensor:
        kv = ContiguousKV(cfg.num_layers, 1, cfg.num_kv_heads, len(ids) + 1, cfg.head_dim, model.dtype, CUDA)
        with torch.inference_mode():
            model(torch.tensor([ids], device=CUDA), torch.arange(len(ids), device=CUDA)[None], kv)
            last = torch.tensor([[len(ids)]], device=CUDA)
            return model(torch.tensor([[7]], device=CUDA), last, kv)[0, -1].float().cpu()

    normed_calls = []
    plain_qmatvec = quant_kernels.qmatvec

    def counting(*args, **kwargs):
        normed_calls.append(kwargs.get("norm") is not None)
        return plain_qmatvec(*args, **kwargs)

    monkeypatch.setattr(quant_kernels, "qmatvec", counting)
    fused = step()
    assert sum(normed_calls) >= 2 * cfg.num_layers          # q/k/v and gate/up of every layer
    monkeypatch.setitem(quant_ops._PROLOGUE_KERNELS, "normed", False)
    normed_calls.clear()
    apart = step()
    assert not any(normed_calls)
    assert torch.corrcoef(torch.stack([fused, apart]))[0, 1] > 0.999
    assert fused.argmax() == apart.argmax()
