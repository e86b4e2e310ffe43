"""The files `quant_families` writes on the GPU machine (issue 17: Qwen3-8B, Phi-4-mini and
Gemma-3-12B as random Q4_K_M blocks, benchmarks/shape_gguf.write_block_shape) made here at a
few layers and small widths, each family's own tensors and metadata kept: our loader reads
each back as its config, its weights in blocks, and answers; llama.cpp runs the very same
file. So the lease's first run of that part measures, and does not find a missing tensor."""
from __future__ import annotations

import pytest
import torch

from benchmarks.shape_gguf import write_block_shape
from engines.torch.load.gguf_loader import load_gguf, open_reader
from engines.torch.model.attention import ContiguousKV
from engines.torch.model.configs import named_config
from engines.torch.quant.modules import QuantLinear

# Widths in whole 256-weight super-blocks, so the K-quants are chosen as at full size.
SMALL = dict(num_layers=2, vocab_size=1024, dim=512, num_heads=4, num_kv_heads=2, ffn_dim=768)


@pytest.mark.parametrize("name", ["qwen3-8b", "phi-4-mini", "gemma-3-12b"])
def test_a_familys_block_shape_loads_answers_and_runs_in_llama_cpp(tmp_path, name):
    full = named_config(name)
    cfg = full.replace(**SMALL, head_dim=full.head_dim if full.head_dim * 4 <= 1024 else 128,
                       layer_windows=full.layer_windows[:SMALL["num_layers"]])
    path = write_block_shape(cfg, tmp_path / f"{name}.gguf")
    types = {t.tensor_type.name for t in open_reader(path).tensors}
    assert "Q4_K" in types and "Q6_K" in types
    model, _ = load_gguf(path, "cpu", torch.float32, llamacpp_numerics=False)
    got = model.cfg
    assert (got.arch, got.dim, got.num_layers, got.head_dim, got.qk_norm, got.sandwich_norms) == \
        (cfg.arch, cfg.dim, cfg.num_layers, cfg.head_dim, cfg.qk_norm, cfg.sandwich_norms)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) >= 2 * cfg.num_layers
    ids = [5, 17, 300, 42]
    kv = ContiguousKV(cfg.num_layers, 1, cfg.num_kv_heads, len(ids), cfg.head_dim, model.dtype, "cpu")
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], kv)
    assert logits.shape == (1, len(ids), cfg.vocab_size) and torch.isfinite(logits).all()
    pytest.importorskip("llama_cpp")
    from engines.llamacpp.native import plain_llama   # use_extra_bufts really off (AMX)

    llm = plain_llama(str(path), n_ctx=64, n_threads=1, verbose=False)
    llm.eval(ids)
    assert llm.n_tokens == len(ids)
