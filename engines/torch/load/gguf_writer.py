"""Write a model as a GGUF file the way convert_hf_to_gguf.py writes it.

The family's llama.cpp tensor names (the inverse of gguf_names), its metadata
keys, Q/K rows permuted for llama-arch files, a byte-level BPE vocabulary of
the config's size. Tests write tiny random models with it
(tests/engines/tiny_families.py) and benchmarks/shape_gguf.py writes real
shapes (Llama-3.1-8B, Qwen2.5-7B...) with random weights; llama.cpp loads,
quantizes and runs both, so the peer reads the very file the torch engine reads.

Tensors are streamed: `write_gguf` takes the HF names and shapes first and
asks `make(name, shape)` for each array only as it writes it, so an 8B model
never sits in host memory whole.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from engines.torch.load.gguf_names import _BASE_LAYER, FAMILY_LAYER_NAMES, GLOBAL_NAMES
from engines.torch.model.configs import ModelConfig

BOS_ID, EOS_ID = 256, 257


def gguf_tensor_name(hf: str, arch: str) -> str:
    """HF parameter name -> llama.cpp tensor name for the family."""
    inverse_globals = {v: k for k, v in GLOBAL_NAMES.items()}
    if hf in inverse_globals:
        return inverse_globals[hf]
    parts = hf.split(".")                                # model.layers.N.<module...>.<suffix>
    module = ".".join(parts[3:-1])
    table = {**{v: k for k, v in _BASE_LAYER.items()},
             **{v: k for k, v in FAMILY_LAYER_NAMES.get(arch, {}).items()}}
    return f"blk.{parts[2]}.{table[module]}.{parts[-1]}"


def permute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (gguf_loader.unpermute_qk inverts it)."""
    return (w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def byte_vocab(vocab_size: int) -> tuple[list[str], list[int]]:
    """256 byte tokens, <|bos|>, <|eos|>, one merged token, then unused tokens up to vocab_size."""
    from engines.text.tokenizer import _byte_decoder

    decoder = _byte_decoder()
    byte_chars = sorted(decoder, key=lambda c: decoder[c])
    # llama.cpp refuses a BPE vocabulary without merges: one merge, "Ġ" + "t".
    tokens = byte_chars + ["<|bos|>", "<|eos|>", "Ġt"]
    tokens += [f"<|unused{i}|>" for i in range(vocab_size - len(tokens))]
    types = [1] * 256 + [3, 3, 1] + [3] * (len(tokens) - 259)
    return tokens, types


def write_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, extra: dict[str, Any]) -> None:
    """The common keys, the family's `extra` keys (without the arch prefix), the vocabulary."""
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_context)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.rotary_dim)
    if cfg.norm == "layer":
        w.add_layer_norm_eps(cfg.rms_eps)
    else:
        w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    if cfg.num_experts:   # what the loader builds experts from (a family's extra may say it too)
        moe = {"expert_count": cfg.num_experts, "expert_used_count": cfg.num_experts_used}
        if cfg.arch == "qwen3moe":
            moe["expert_feed_forward_length"] = cfg.ffn_dim
        extra = {**moe, **extra}
    for key, value in extra.items():
        full = f"{cfg.arch}.{key}"
        if isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, value)
    tokens, types = byte_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor the model takes (a tied head left out)."""
    import torch

    from engines.torch.model.model import LlamaModel

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaModel(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _stored(cfg: ModelConfig, name: str, array: np.ndarray, float16: bool) -> np.ndarray:
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    proj = name.split(".")[-2] if name.count(".") else ""
    if cfg.arch == "llama" and proj in heads:
        array = permute_qk(array, heads[proj])
    if array.ndim >= 2 and float16:
        array = array.astype(np.float16)
    return np.ascontiguousarray(array)


def write_gguf(path: Path, cfg: ModelConfig, extra: dict[str, Any], shapes: dict[str, tuple[int, ...]],
               make: Callable[[str, tuple[int, ...]], np.ndarray], float16: bool = False,
               chat_template: str = "") -> Path:
    """A GGUF of cfg.arch at path; make(hf_name, shape) gives each tensor (float32) as it is
    written. 2-D and 3-D weights are stored as F16 where float16, else F32 (norms stay F32).
    chat_template: the family's Jinja template, as its real files carry it."""
    w = gguf.GGUFWriter(str(path), cfg.arch)
    write_metadata(w, cfg, extra)
    if chat_template:
        w.add_chat_template(chat_template)
    extras: dict[str, np.ndarray] = {}
    if cfg.rope_scaling.kind == "longrope":
        extras["rope_factors_long.weight"] = np.array(cfg.rope_scaling.long_factors, dtype=np.float32)
        extras["rope_factors_short.weight"] = np.array(cfg.rope_scaling.short_factors, dtype=np.float32)
    for name, array in extras.items():
        w.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
    for name, shape in shapes.items():
        dtype = np.dtype(np.float16 if float16 and len(shape) >= 2 else np.float32)
        w.add_tensor_info(gguf_tensor_name(name, cfg.arch), shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for array in extras.values():
        w.write_tensor_data(array)
    for name, shape in shapes.items():
        w.write_tensor_data(_stored(cfg, name, np.asarray(make(name, shape), dtype=np.float32), float16))
    w.close()
    return path
