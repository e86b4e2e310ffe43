"""q, k and v of different types in one launch (engines/torch/kernels/quant_group.py) on
CUDA: SmolLM2's Q4_K_M shapes (q, k Q5_0 and v Q8_0 over rows of 576) against each matvec
alone, with a deferred norm as x, inside a CUDA graph; and a model whose v projections are
Q8_0 where q and k are Q5_0, decoded in graphs with the group on and off: the same kernel
code per part, so the same logits up to the order of float32 sums."""
from __future__ import annotations

import pytest
import torch

from engines.torch.kernels import fused_small, quant_group, quant_ops
from engines.torch.kernels.normed_input import NormedInput
from engines.torch.kernels.quant_kernels import qmatvec
from engines.torch.kernels.quant_weight import QuantWeight
from tests.engines.quant_blocks import random_blocks
from tests.gpu.test_pdl_gpu import CFG, _decode_logits, gguf, random_state, write_tiny_gguf

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
SMOLLM2_QKV = (("Q5_0", 576), ("Q5_0", 192), ("Q8_0", 192))


def weights(parts, cols: int = 576) -> list[QuantWeight]:
    return [QuantWeight.from_gguf(torch.from_numpy(random_blocks(t, rows, cols, seed=i).copy()), t, (rows, cols), CUDA)
            for i, (t, rows) in enumerate(parts)]


def side_by_side(x, ws) -> torch.Tensor:
    return torch.cat([qmatvec(x, w) for w in ws], dim=-1)


def test_smollm2_qkv_in_one_launch_equals_three():
    ws = weights(SMOLLM2_QKV)
    assert quant_group.grouped(ws, 1)
    x = torch.randn(1, 576, device=CUDA, dtype=torch.bfloat16)
    got, want = quant_group.qmatvec_group(x, ws, [None] * 3), side_by_side(x, ws)
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-2)


def test_a_deferred_norm_in_a_graph():
    ws = weights(SMOLLM2_QKV)
    x, delta = torch.randn(1, 576, device=CUDA, dtype=torch.bfloat16), torch.randn(1, 576, device=CUDA,
                                                                                dtype=torch.bfloat16)
    g = torch.rand(576, device=CUDA, dtype=torch.bfloat16) + 0.5
    h = NormedInput(x, delta, g, 1e-5)
    quant_ops.qlinear_group(h, ws, [None] * 3)          # built outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = quant_ops.qlinear_group(h, ws, [None] * 3)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        x.copy_(torch.randn(1, 576, generator=gen).to(CUDA, torch.bfloat16))
        delta.copy_(torch.randn(1, 576, generator=gen).to(CUDA, torch.bfloat16))
        graph.replay()
        total, normed = fused_small.add_rms_norm(x, delta, g, 1e-5)
        want = side_by_side(NormedInput(x, delta, g, 1e-5), ws)
        torch.testing.assert_close(torch.cat(outs, dim=-1).float(), want.float(), rtol=2 ** -7, atol=1e-2)
        assert torch.equal(h.sum, total)
    assert quant_ops._GROUP_KERNELS["on"]


def test_an_8b_q_on_dp4a_beside_k_and_v_grouped():
    """Llama-3.1-8B's Q4_K_M attention input: q (Q4_K, 4096 rows) takes dp4a, k (Q4_K) and v
    (Q6_K, 1024 rows each) one group launch; all three from one deferred norm."""
    from engines.torch.kernels import quant_dp4a

    q, k, v = weights((("Q4_K", 4096), ("Q4_K", 1024), ("Q6_K", 1024)), 4096)
    assert quant_dp4a.chosen(q, 1) and quant_ops._groupable([q, k, v], 1) == [1, 2]
    gen = torch.Generator().manual_seed(0)
    x, delta = (torch.randn(1, 4096, generator=gen).to(CUDA, torch.bfloat16) for _ in range(2))
    g = torch.rand(4096, device=CUDA, dtype=torch.bfloat16) + 0.5
    h = NormedInput(x, delta, g, 1e-5)
    outs = quant_ops.qlinear_group(h, [q, k, v], [None] * 3)
    for got, w in zip(outs, (q, k, v)):
        want = quant_ops.qlinear_normed(NormedInput(x, delta, g, 1e-5), w, None)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2e-2)
    assert torch.equal(h.sum, x + delta)


def test_graphed_decode_with_mixed_qkv_types_grouped_or_not(tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "mixed.gguf", CFG, random_state(CFG, seed=5),
                           qtype=gguf.GGMLQuantizationType.Q5_0,
                           qtype_of={"v_proj": gguf.GGMLQuantizationType.Q8_0})
    monkeypatch.setitem(quant_ops._GROUP_KERNELS, "on", False)
    apart = _decode_logits(path, True)
    monkeypatch.setitem(quant_ops._GROUP_KERNELS, "on", True)
    launches = []
    group = quant_group.qmatvec_group
    monkeypatch.setattr(quant_group, "qmatvec_group", lambda *a: launches.append(1) or group(*a))
    grouped = _decode_logits(path, True)
    assert launches, "the group kernel never ran: the test would compare the unfused path with itself"
    for step, (a, b) in enumerate(zip(apart, grouped)):
        assert (a - b).abs().max().item() <= 0.01 * a.abs().max().item() + 0.02, f"step {step}: logits drift"
        assert a.argmax() == b.argmax(), f"step {step}: greedy token differs"
