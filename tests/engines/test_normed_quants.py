"""A norm that writes its output's q8_1 quants in the same launch (fused_small with
`quantize`, kernels/normed_quants.py), through Triton's interpreter: the quants are
bit for bit what quant_dp4a.quantize_x computes from the output in memory, the
integer-dot matvec reading the output finds them without a launch, and the model
marks exactly the norms an integer-dot projection reads (model/quantized_norms.py).
The GPU runs the kernels in tests/gpu/test_fused_small_gpu.py."""
from __future__ import annotations

import gc
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.torch.kernels import fused_small, normed_quants, quant_dp4a  # noqa: E402


def _launched_quants(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """quantize_x's own launch over x's bytes (a copy: nothing remembered for it)."""
    return quant_dp4a.quantize_x(x.clone().reshape(-1))


@pytest.mark.parametrize("rows,cols", [(1, 2048), (3, 576), (2, 96)])
def test_a_norm_writes_the_quants_quantize_x_would(rows: int, cols: int) -> None:
    gen = torch.Generator().manual_seed(cols)
    x = (torch.randn(rows, cols, generator=gen) * 3).to(torch.bfloat16)
    delta = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    weight = torch.randn(cols, generator=gen)
    plain = fused_small.rms_norm(x, weight, 1e-6)
    for normed in (fused_small.rms_norm(x, weight, 1e-6, quantize=True),
                   fused_small.add_rms_norm(x, delta, weight, 1e-6, quantize=True)[1]):
        found = normed_quants.recall(normed.reshape(-1))
        assert found is not None
        for got, want in zip(found, _launched_quants(normed)):
            assert torch.equal(got, want)
    assert torch.equal(fused_small.rms_norm(x, weight, 1e-6, quantize=True), plain)   # the output unchanged
    assert normed_quants.recall(plain) is None                                       # not asked: none written


def test_quantize_x_takes_the_norms_quants_without_a_launch(monkeypatch) -> None:
    x = torch.randn(1, 256).to(torch.bfloat16)
    normed = fused_small.rms_norm(x, torch.ones(256), 1e-6, quantize=True)
    want = _launched_quants(normed)
    monkeypatch.setattr(quant_dp4a.dp4a_kernels, "quantize_x_kernel", None)   # any launch would fail
    got = quant_dp4a.quantize_x(normed.contiguous().reshape(-1))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_an_entry_never_serves_other_bytes() -> None:
    normed = fused_small.rms_norm(torch.randn(2, 64).to(torch.bfloat16), torch.ones(64), 1e-6, quantize=True)
    assert normed_quants.recall(normed[:1]) is None                  # fewer bytes at the same address
    assert normed_quants.recall(normed.clone()) is None              # the same values elsewhere
    view = normed.reshape(-1)
    del normed
    gc.collect()
    assert normed_quants.recall(view) is None                        # the norm's tensor is gone


def _quant_linear(type_name: str, rows: int, cols: int):
    from engines.torch.kernels.quant_weight import QuantWeight
    from engines.torch.quant.modules import QuantLinear
    from tests.engines.quant_blocks import block_bytes

    raw = torch.from_numpy(block_bytes(type_name, rows, cols, 1).copy())
    return QuantLinear(QuantWeight.from_gguf(raw, type_name, (rows, cols), "cpu"), None, torch.bfloat16)


def test_the_norms_an_integer_dot_projection_reads_are_marked(monkeypatch) -> None:
    from engines.torch.model.configs import named_config
    from engines.torch.model.model import LlamaModel
    from engines.torch.model.quantized_norms import mark_quantized_norms

    monkeypatch.setattr(quant_dp4a, "ONE_ROW_MIN_ROWS", 512)     # these rows count as wide enough
    cfg = named_config("llama-3.2-1b").replace(num_layers=2, dim=256, ffn_dim=512, num_heads=4, num_kv_heads=2,
                                               head_dim=64, vocab_size=512, tie_embeddings=False)
    with torch.device("meta"):
        model = LlamaModel(cfg)
    first, second = model.model.layers
    first.self_attn.qkv_proj = _quant_linear("Q4_K", 512, 256)      # integer dots: 512 rows, Q4_K
    first.mlp.gate_up_proj = _quant_linear("Q5_K", 1024, 256)       # no integer-dot kernel for Q5_K
    second.self_attn.q_proj = _quant_linear("Q8_0", 256, 256)       # too few rows: the float matvec
    second.mlp.gate_up_proj = _quant_linear("Q6_K", 1024, 256)
    assert mark_quantized_norms(model) == 2
    assert first.input_layernorm.quantize_output and not first.post_attention_layernorm.quantize_output
    assert not second.input_layernorm.quantize_output and second.post_attention_layernorm.quantize_output
    assert not model.model.norm.quantize_output                     # a dense output head
