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


def test_random_q4_k_m_blocks_written_straight_read_back_in_their_types(tmp_path):
    """write_block_shape (benchmarks/quant_compiled.py's file, no quantizer): llama.cpp's
    Q4_K_M mix of types, rows of whole super-blocks in K-quants, the rest their fallbacks;
    the loader reads it as the config, every 2-D weight's bytes the file's."""
    from benchmarks.shape_gguf import q4_k_m_type, write_block_shape

    cfg = CFG.replace(dim=512, num_heads=8, num_kv_heads=2, head_dim=64, ffn_dim=640, num_layers=8)
    path = write_block_shape(cfg, tmp_path / "blocks.gguf")
    types = {t.name: t.tensor_type.name for t in open_reader(path).tensors}
    assert types["blk.0.attn_v.weight"] == "Q6_K" and types["blk.2.attn_v.weight"] == "Q4_K"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"        # 640 columns: not whole super-blocks
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert set(types.values()) == {"Q4_K", "Q6_K", "Q8_0", "Q5_0", "F32"}
    assert q4_k_m_type("lm_head.weight", cfg, 512) == "Q6_K"
    model, _ = load_gguf(path, "cpu", torch.float32, llamacpp_numerics=False)
    assert (model.cfg.dim, model.cfg.num_layers, model.cfg.ffn_dim) == (512, 8, 640)
    assert write_block_shape(cfg, path) == path               # kept, not redone


def test_an_moe_shape_as_random_blocks_stacks_its_experts_in_blocks(tmp_path):
    """quant_decode --blocks for Qwen3-30B-A3B's shape (its F16 file would not fit the GPU
    machine's disk): stacked experts 3-D in Q4_K/Q6_K, the router F32 as llama.cpp keeps it;
    our loader keeps the experts in blocks and llama.cpp runs the very same file."""
    from benchmarks.shape_gguf import write_block_shape
    from engines.torch.quant.modules import QuantExperts

    cfg = named_config("qwen3-30b-a3b").replace(num_layers=2, vocab_size=1024, dim=512, num_heads=8,
                                                num_kv_heads=2, head_dim=64, ffn_dim=256, num_experts=8,
                                                num_experts_used=2)
    path = write_block_shape(cfg, tmp_path / "moe.gguf")
    tensors = {t.name: t for t in open_reader(path).tensors}
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type.name == "Q4_K"
    assert len(tensors["blk.0.ffn_gate_exps.weight"].shape) == 3
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type.name == "Q6_K"   # a use_more_bits layer
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    model, _ = load_gguf(path, "cpu", torch.float32, llamacpp_numerics=False)
    # gate and up (both Q4_K) one stack of [gate_e | up_e] rows an expert, and down: two a layer
    assert sum(isinstance(m, QuantExperts) for m in model.modules()) == 2 * 2
    pytest.importorskip("llama_cpp")
    from engines.llamacpp.native import plain_llama   # use_extra_bufts really off (AMX)

    llm = plain_llama(str(path), n_ctx=64, n_threads=1, verbose=False)
    llm.eval([1, 2, 3])
    assert llm.n_tokens == 3


@pytest.mark.parametrize("recipe,head", [("Q8_0", "Q8_0"), ("Q4_0", "Q6_K")])
def test_q8_0_and_q4_0_files_as_random_blocks(tmp_path, recipe, head):
    """quant_decode --blocks --types Q8_0,Q4_0: every 2-D weight of the recipe's type, the head
    of a Q4_0 file Q6_K as llama.cpp's quantizer writes it; the loader reads them."""
    from benchmarks.shape_gguf import write_block_shape

    cfg = CFG.replace(dim=512, num_heads=8, num_kv_heads=2, head_dim=64, ffn_dim=768, num_layers=2,
                      tie_embeddings=False)
    path = write_block_shape(cfg, tmp_path / f"{recipe}.gguf", recipe=recipe)
    types = {t.name: t.tensor_type.name for t in open_reader(path).tensors}
    assert types["output.weight"] == head and types["blk.1.ffn_down.weight"] == recipe
    assert set(types.values()) == {recipe, head, "F32"}
    model, _ = load_gguf(path, "cpu", torch.float32, llamacpp_numerics=False)
    assert model.cfg.num_layers == 2


def test_an_unknown_recipe_is_refused_by_name(tmp_path):
    from benchmarks.shape_gguf import write_block_shape

    with pytest.raises(ValueError, match="Q3_K_S"):
        write_block_shape(CFG, tmp_path / "x.gguf", recipe="Q3_K_S")
