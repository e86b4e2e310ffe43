"""benchmarks/shape_gguf.py: a config written as F16 with the shared GGUF writer and
quantized by llama.cpp's quantizer reads back as the same config, its weights in
the quantized type, and runs in llama.cpp (the peer reads the very same file)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.shape_gguf import quantize, shape_paths, write_shape
from engines.torch.load.gguf_loader import load_gguf, open_reader
from engines.torch.model.configs import named_config

# SmolLM2's shape with 2 layers and a smaller vocabulary: seconds, not minutes.
CFG = named_config("smollm2-135m").replace(num_layers=2, vocab_size=1024)


def test_shape_written_quantized_and_read_back(tmp_path):
    pytest.importorskip("llama_cpp")
    source, quantized = shape_paths(tmp_path, "small", ["Q8_0"])
    write_shape(CFG, source)
    path = quantize(source, quantized["Q8_0"], "Q8_0")
    assert {t.tensor_type.name for t in open_reader(source).tensors} == {"F16", "F32"}
    assert {t.tensor_type.name for t in open_reader(path).tensors} == {"Q8_0", "F32"}
    model, _ = load_gguf(path, "cpu", torch.float32, llamacpp_numerics=False)
    cfg = model.cfg
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_dim, cfg.vocab_size,
            cfg.tie_embeddings, cfg.rope_theta) == (CFG.dim, 2, 9, 3, 1536, 1024, True, CFG.rope_theta)
    assert quantize(source, path, "Q8_0") == path            # kept, not redone

    from engines.llamacpp.native import plain_llama   # use_extra_bufts really off (AMX)

    llm = plain_llama(str(path), n_ctx=64, n_threads=1, verbose=False)
    llm.eval([1, 2, 3])
    assert llm.n_tokens == 3
