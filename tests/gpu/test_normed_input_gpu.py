"""The projection after a pre-norm reading rms_norm(x + delta) itself
(engines/torch/kernels/normed_input.py) on CUDA: the float matvec with the norm in its x
loads against the separate add + norm kernel followed by the plain matvec, at the shapes
that take it (SmolLM2's rows of 576, an 8B's Q5_K rows of 4096), in and out of a CUDA
graph; the residual sum it writes bit-equal to torch's; and a quantized model's graphed
decode with the deferred norms against the same model with them off (the kernel keeps
x in float32 where the separate norm rounds it to bf16, so logits are close, not equal)."""
from __future__ import annotations

import pytest
import torch

from engines.torch.kernels import fused_small, quant_dp4a, quant_ops
from engines.torch.kernels.normed_input import NormedInput
from engines.torch.kernels.quant_kernels import qmatvec
from engines.torch.kernels.quant_weight import QuantWeight
from engines.torch.load.dequant import dequantize_raw
from tests.engines.quant_blocks import random_blocks
from tests.gpu.test_pdl_gpu import CFG, _decode_logits, gguf, write_tiny_gguf, random_state

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
BOUND = 2.0 ** -8


def weight(type_name: str, rows: int, cols: int) -> tuple[QuantWeight, torch.Tensor]:
    raw = torch.from_numpy(random_blocks(type_name, rows, cols, seed=rows).copy())
    return QuantWeight.from_gguf(raw, type_name, (rows, cols), CUDA), dequantize_raw(raw, type_name, (rows, cols))


def stream(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=gen) * 3).to(CUDA, torch.bfloat16)
    delta = torch.randn(rows, cols, generator=gen).to(CUDA, torch.bfloat16)
    g = (torch.rand(cols, generator=gen) + 0.5).to(CUDA, torch.bfloat16)
    return x, delta, g


def check(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> None:
    scale = x.float().abs().cpu() @ ref.abs().float().t()
    err = (got.float() - want.float()).abs().cpu()
    assert torch.all(err <= BOUND * scale + 1e-2), (err / (scale + 1e-2)).max()


@pytest.mark.parametrize("type_name,rows,cols", [("Q5_0", 960, 576), ("Q8_0", 576, 576), ("Q4_K", 2048, 512),
                                                 ("Q8_0", 49152, 576), ("Q6_K", 1536, 768), ("Q5_K", 4096, 4096)])
@pytest.mark.parametrize("rows_of_x", [1, 2, 4])
def test_normed_matvec_equals_the_norm_kernel_then_the_matvec(type_name, rows, cols, rows_of_x):
    w, ref = weight(type_name, rows, cols)
    x, delta, g = stream(rows_of_x, cols, seed=rows_of_x)
    total, normed = fused_small.add_rms_norm(x, delta, g, 1e-5)
    h = NormedInput(x, delta, g, 1e-5)
    check(qmatvec(h, w), qmatvec(normed, w), normed, ref)
    assert torch.equal(h.sum, total) and torch.equal(total, x + delta)


@pytest.mark.parametrize("type_name,rows,rows_of_x", [("Q4_K", 4096, 1), ("Q4_K", 28672, 1), ("Q4_K", 28672, 2),
                                                      ("Q6_K", 4096, 1), ("Q6_K", 4096, 2)])
def test_dp4a_quantizing_the_norm_equals_the_norm_kernel_then_dp4a(type_name, rows, rows_of_x):
    """The 8B's dp4a projections (q, gate|up): x quantized from the norm read in place
    (a quant moves by one where bf16's rounding of x would have moved it: within 2^-7)."""
    w, ref = weight(type_name, rows, 4096)
    x, delta, g = stream(rows_of_x, 4096, seed=rows_of_x)
    total, normed = fused_small.add_rms_norm(x, delta, g, 1e-5)
    h = NormedInput(x, delta, g, 1e-5)
    assert quant_dp4a.chosen(w, rows_of_x)
    got, want = quant_ops.qlinear_normed(h, w, None), quant_dp4a.qmatvec_dp4a(normed, w)
    scale = normed.float().abs().cpu() @ ref.abs().float().t()
    err = (got.float() - want.float()).abs().cpu()
    assert torch.all(err <= 2.0 ** -7 * scale + 1e-2), (err / (scale + 1e-2)).max()
    assert torch.equal(h.sum, total)


def test_without_an_addend_the_norm_of_x():
    w, ref = weight("Q5_0", 960, 576)
    x, _, g = stream(1, 576, seed=9)
    normed = fused_small.rms_norm(x, g, 1e-5)
    check(qmatvec(NormedInput(x, None, g, 1e-5), w), qmatvec(normed, w), normed, ref)


def test_normed_matvec_in_a_cuda_graph_reads_each_replays_inputs():
    w, ref = weight("Q5_0", 960, 576)
    x, delta, g = stream(1, 576, seed=1)
    h = NormedInput(x, delta, g, 1e-5)
    quant_ops.qlinear_normed(h, w, None)                   # built outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quant_ops.qlinear_normed(h, w, None)
    for seed in range(3):
        nx, nd, _ = stream(1, 576, seed=10 + seed)
        x.copy_(nx)
        delta.copy_(nd)
        graph.replay()
        total, normed = fused_small.add_rms_norm(x, delta, g, 1e-5)
        check(out, quant_ops.qlinear(normed, w), normed, ref)
        assert torch.equal(h.sum, total)
    assert quant_ops._NORMED_KERNELS["on"]                 # built here: no fallback taken


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_graphed_decode_with_deferred_norms_matches_separate_norms(tmp_path, qtype, monkeypatch):
    path = write_tiny_gguf(tmp_path / f"{qtype}.gguf", CFG, random_state(CFG, seed=5),
                           qtype=gguf.GGMLQuantizationType[qtype])
    monkeypatch.setitem(quant_ops._NORMED_KERNELS, "on", False)
    separate = _decode_logits(path, True)
    monkeypatch.setitem(quant_ops._NORMED_KERNELS, "on", True)
    deferred = _decode_logits(path, True)
    for step, (a, b) in enumerate(zip(separate, deferred)):
        spread = a.abs().max().item()
        assert (a - b).abs().max().item() <= 0.02 * spread + 0.05, f"step {step}: logits drift"
        assert a.argmax() == b.argmax(), f"step {step}: greedy token differs"
