"""The one-launch RMSNorm and gated activation on the GPU (engines/torch/kernels/fused_small.py),
against the torch ops they replace in an eager step (compiled steps keep the torch ops:
Inductor fuses those itself)."""
from __future__ import annotations

import pytest
import torch

from engines.torch.kernels import fused_small
from engines.torch.model.mlp import ACTIVATIONS


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


@pytest.mark.parametrize("cols", [576, 4096, 5120])
@pytest.mark.parametrize("rows", [1, 2, 8, 512])
def test_rms_norm_on_the_gpu(rows: int, cols: int) -> None:
    x = torch.randn(rows, 1, cols, device="cuda", dtype=torch.bfloat16) * 3
    weight = torch.randn(cols, device="cuda")
    assert fused_small.usable(x)
    got = fused_small.rms_norm(x, weight, 1e-5)
    # Float32 inside both; summed in another order, a value next to a rounding boundary
    # lands one bf16 step away (3 of 2M values at 512 rows on the H100): one step allowed.
    torch.testing.assert_close(got.float(), torch_rms_norm(x, weight, 1e-5).float(), rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("cols", [1536, 14336])
def test_gated_activation_on_the_gpu(kind: str, cols: int) -> None:
    h = torch.randn(8, 1, 2 * cols, device="cuda", dtype=torch.bfloat16) * 3
    gate, up = h.float().chunk(2, dim=-1)
    got = fused_small.gated_activation(h, kind)
    torch.testing.assert_close(got.float(), ACTIVATIONS[kind](gate) * up, rtol=2 ** -8, atol=1e-3)


@pytest.mark.parametrize("cols", [576, 4096])
def test_add_rms_norm_on_the_gpu(cols: int) -> None:
    """The residual's sum is torch's bf16 add exactly; the norm reads that sum."""
    x = torch.randn(8, 1, cols, device="cuda", dtype=torch.bfloat16) * 3
    delta = torch.randn_like(x)
    weight = torch.randn(cols, device="cuda")
    total, normed = fused_small.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta)
    # One bf16 step, as test_rms_norm_on_the_gpu allows: a value next to a rounding boundary
    # lands on either side in another summation order (1 of 32,768 on the H200 at 4,096).
    torch.testing.assert_close(normed.float(), torch_rms_norm(x + delta, weight, 1e-5).float(),
                               rtol=2 ** -7, atol=1e-3)


def test_kernels_are_captured_in_a_cuda_graph() -> None:
    x = torch.randn(2, 1, 4096, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(4096, device="cuda")
    fused_small.rms_norm(x, weight, 1e-5)   # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_small.rms_norm(x, weight, 1e-5)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out.float(), torch_rms_norm(x, weight, 1e-5).float(), rtol=2 ** -8, atol=1e-3)


def test_compiled_code_keeps_the_torch_ops() -> None:
    seen = []

    def step(x: torch.Tensor) -> torch.Tensor:
        seen.append(fused_small.usable(x))
        return x * 2

    torch.compile(step)(torch.ones(4, device="cuda"))
    assert seen == [False]


@pytest.mark.parametrize("batch", [1, 8])
def test_rms_norm_pair_on_the_gpu(batch: int) -> None:
    """Qwen3-8B's q (32 heads) and k (8 heads) norms of one qkv output, in one launch."""
    qkv = torch.randn(batch, 1, 6144, device="cuda", dtype=torch.bfloat16) * 3
    q, k, _ = qkv.split([4096, 1024, 1024], dim=-1)
    q, k = q.reshape(batch, 1, 32, 128), k.reshape(batch, 1, 8, 128)
    wq, wk = torch.randn(128, device="cuda"), torch.randn(128, device="cuda")
    got_q, got_k = fused_small.rms_norm_pair(q, wq, k, wk, 1e-6)
    torch.testing.assert_close(got_q.float(), torch_rms_norm(q, wq, 1e-6).float(), rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(got_k.float(), torch_rms_norm(k, wk, 1e-6).float(), rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("head_dim,rope_dim", [(64, 64), (128, 96)])
def test_rope_table_equals_rotarys_torch_ops(head_dim, rope_dim):
    """The one-launch cos/sin table (kernels/rope_table.py) against Rotary's torch ops on the
    GPU, positions up to 32k (the angle's range reduction is the kernel's libdevice cos/sin)."""
    from engines.torch.kernels import rope_table
    from engines.torch.model.rotary import Rotary

    rotary = Rotary(head_dim, rope_dim, 500000.0).to("cuda")
    positions = torch.tensor([[0, 1, 77, 4095, 8191, 32767]], device="cuda")
    assert rope_table.usable(positions)
    got_cos, got_sin = rotary(positions)
    freqs = positions.unsqueeze(-1).float() * rotary.inv_freq
    emb = torch.nn.functional.pad(torch.cat((freqs, freqs), dim=-1), (0, head_dim - rope_dim)).unsqueeze(1)
    torch.testing.assert_close(got_cos, emb.cos() * rotary.mscale, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got_sin, emb.sin() * rotary.mscale, rtol=1e-5, atol=2e-5)
