"""Tiny Llama-family models written to real GGUF files, for loader tests.

A random HF-layout state is written the way convert_hf_to_gguf.py writes it
(llama.cpp names, Q/K rows permuted for llama-arch, byte-level vocabulary), so
a loader test can compare what comes back with what went in, and llama.cpp can
run the very same file as an independent reference. Shapes are multiples of 256
so llama.cpp can quantize the file to K-quants (Q4_K, Q5_K, Q6_K).
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from engines.torch.load.gguf_writer import byte_vocab, permute_qk
from engines.torch.model.configs import ModelConfig
from engines.torch.model.model import LlamaModel

TINY = ModelConfig(vocab_size=512, dim=256, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=64, ffn_dim=512, rope_theta=10000.0, rms_eps=1e-5,
                   tie_embeddings=False, max_context=512, bos_id=256, eos_ids=(257,))

_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_GLOBALS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named float32 weights, scaled so activations stay O(1) across layers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaModel(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            state[name] = 0.1 * torch.randn(shape, generator=gen)
        else:
            state[name] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    return state


permute = permute_qk     # convert_hf_to_gguf.py's LlamaModel.permute


def gguf_name(hf: str) -> str:
    if hf in _GLOBALS:
        return _GLOBALS[hf]
    parts = hf.split(".")               # model.layers.N.<module...>.weight
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{_TO_GGUF[module]}.{parts[-1]}"


def write_tiny_gguf(path: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str = "llama",
                    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
                    rope_freqs: np.ndarray | None = None,
                    qtype_of: dict[str, gguf.GGMLQuantizationType] | None = None) -> Path:
    """Write cfg/state as a GGUF file; 2-D weights stored as `qtype` (norms stay F32), or as
    qtype_of[projection] for the projections it names ("v_proj": a Q4_K_M file's mix).
    rope_freqs: llama3-style per-frequency divisors, stored as convert_hf_to_gguf does."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_context)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    tokens, types = byte_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_add_bos_token(False)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    for name, tensor in state.items():
        array = tensor.float().numpy()
        proj = name.split(".")[-2]
        if arch == "llama" and proj in heads:
            array = permute(array, heads[proj])
        stored = (qtype_of or {}).get(proj, qtype)
        if array.ndim == 2 and stored != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(array, stored), raw_dtype=stored)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
