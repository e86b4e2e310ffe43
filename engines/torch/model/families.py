"""The model families the torch engine implements, and how a GGUF file states each.

`FAMILIES` is the one table (CONVENTIONS 7): per GGUF architecture, the traits
its files do not spell out and llama.cpp hard-codes (llama.cpp's
`llama-model.cpp` load_hparams and graph builders, and what
`convert_hf_to_gguf.py` bakes in). `from_gguf_fields` turns a file's
metadata, tensor names and RoPE tensors into a `ModelConfig`. No torch here:
the engine choice reads this table.

What each family needs that a file may not say:
- Llama (and Mixtral, which is `llama` with ffn_gate_inp + ffn_*_exps): Q/K
  rows permuted by the converter; a declared sliding window slides every layer;
- Qwen2/2.5(-Coder): biases on q/k/v (read from the tensors);
- Qwen3, Qwen3-MoE: RMSNorm over each head of q and k, before RoPE;
- Gemma 2: GeGLU (tanh GELU), embeddings times sqrt(dim), norms before and
  after attention and the MLP, attention and final soft-caps (defaults 50 and
  30 where the file is silent), every other layer sliding (window 4096 by
  default); the converter already added Gemma's +1 to every norm weight, so
  the file's norms multiply as they are (HF folders: hf_config adds it);
- Gemma 3: as Gemma 2 plus q/k norms, five of six layers sliding, local
  layers on RoPE base 10000 without the file's scaling, no soft-caps;
- Gemma 2/3 27B: queries scaled by 1/sqrt(dim/heads), not 1/sqrt(head_dim)
  (llama.cpp tells the 27B by its layer count, and so do we);
- Phi-3/3.5/4: fused qkv and gate_up tensors, LongRoPE factors as tensors,
  partial rotation via rope.dimension_count; llama.cpp ignores Phi's
  sliding window (its log says so), and so do we, to answer the same;
- StarCoder2: LayerNorm with bias, plain tanh-GELU MLP, biases everywhere.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engines.errors import ModelLoadError
from engines.torch.model.configs import ModelConfig, sliding_pattern
from engines.torch.model.rope import RopeScaling


@dataclass(frozen=True)
class Family:
    norm: str = "rms"
    norm_eps_key: str = "attention.layer_norm_rms_epsilon"
    activation: str = "silu"
    gated_mlp: bool = True
    biases: bool = False               # every projection and norm has a bias (StarCoder2)
    qk_norm: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    fused: bool = False                # gate_up as one tensor (qkv: where the file has attn_qkv)
    permuted_qk: bool = False          # convert_hf_to_gguf.py interleaved Q/K rows (llama)
    window_period: int = 0             # sliding layers: llama.cpp's swa pattern; 0: window ignored
    default_window: int = 0            # where the file gives none
    local_rope_theta: float = 0.0      # sliding layers' RoPE base where the file gives none
    softcaps: tuple[float, float] = (0.0, 0.0)   # (attention, final) defaults where the file is silent
    wide_query_scale_layers: frozenset[int] = frozenset()   # layer counts scaled by dim/heads (Gemma 27B)
    moe: bool = False                  # experts required (Qwen3-MoE); Llama's are optional (Mixtral)
    ggml_numerics: bool = False        # engines.torch.ggml reproduces llama.cpp's CPU kernels for it
    hf_norm_offset: float = 0.0        # HF checkpoints store norm weights minus this (Gemma: 1)
    hf_model_types: tuple[str, ...] = ()   # config.json model_type values this family reads
    notes: tuple[str, ...] = field(default=())


_GEMMA = dict(activation="gelu_tanh", sandwich_norms=True, scale_embeddings=True, hf_norm_offset=1.0)

FAMILIES: dict[str, Family] = {
    "llama": Family(permuted_qk=True, window_period=1, ggml_numerics=True,
                    hf_model_types=("llama", "mistral", "mixtral")),
    "mistral": Family(permuted_qk=True, window_period=1, ggml_numerics=True),
    "qwen2": Family(ggml_numerics=True, hf_model_types=("qwen2",)),
    "qwen3": Family(qk_norm=True, hf_model_types=("qwen3",)),
    "qwen3moe": Family(qk_norm=True, moe=True, hf_model_types=("qwen3_moe",)),
    "gemma2": Family(**_GEMMA, window_period=2, default_window=4096, softcaps=(50.0, 30.0),
                     wide_query_scale_layers=frozenset({46}), hf_model_types=("gemma2",)),
    "gemma3": Family(**_GEMMA, qk_norm=True, window_period=6, local_rope_theta=10000.0,
                     wide_query_scale_layers=frozenset({62}), hf_model_types=("gemma3_text",)),
    "phi3": Family(fused=True, hf_model_types=("phi3",)),
    "starcoder2": Family(norm="layer", norm_eps_key="attention.layer_norm_epsilon",
                         activation="gelu_tanh", gated_mlp=False, biases=True,
                         hf_model_types=("starcoder2",)),
}
SUPPORTED_ARCHS = tuple(FAMILIES)
# llama.cpp's rope.scaling.type strings -> our kinds (absent: "linear" if a factor is given)
_GGUF_ROPE_KINDS = {"none": "none", "linear": "linear", "yarn": "yarn", "longrope": "longrope"}
_SOFTMAX_GATING = 1     # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX


def family(arch: str) -> Family:
    try:
        return FAMILIES[arch]
    except KeyError:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not implemented by the torch engine "
                             f"(implemented: {', '.join(SUPPORTED_ARCHS)})") from None


def gguf_rope_scaling(get: Any, context_length: int,
                      rope_tensors: Mapping[str, Sequence[float]]) -> RopeScaling:
    """RoPE scaling as llama.cpp reads it. A kind it names and we do not know is an
    error, never "none": a silent "none" answers worse past the original context."""
    raw = get("rope.scaling.type")
    factor = float(get("rope.scaling.factor", 0.0) or 0.0)
    original = int(get("rope.scaling.original_context_length", 0) or context_length)
    attn_factor = float(get("rope.scaling.attn_factor", 1.0) or 1.0)
    if "rope_factors_long.weight" in rope_tensors:
        return RopeScaling("longrope", context_length / original, original_max_position=original, attn_factor=attn_factor,
                           long_factors=tuple(rope_tensors["rope_factors_long.weight"]),
                           short_factors=tuple(rope_tensors.get("rope_factors_short.weight",
                                                                rope_tensors["rope_factors_long.weight"])))
    kind = str(raw) if raw is not None else ("linear" if factor not in (0.0, 1.0) else "none")
    if kind not in _GGUF_ROPE_KINDS:
        raise ModelLoadError(f"GGUF rope.scaling.type {kind!r} is not implemented by the torch engine "
                             f"(implemented: {', '.join(_GGUF_ROPE_KINDS)})")
    if kind == "none" or kind == "linear" and factor in (0.0, 1.0):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling("linear", factor)
    return RopeScaling(_GGUF_ROPE_KINDS[kind], factor or 1.0, original_max_position=original,
                       beta_fast=float(get("rope.scaling.yarn_beta_fast", 32.0) or 32.0),
                       beta_slow=float(get("rope.scaling.yarn_beta_slow", 1.0) or 1.0),
                       attn_factor=attn_factor)


def _windows(fam: Family, get: Any, num_layers: int) -> tuple[int, ...]:
    window = int(get("attention.sliding_window", 0) or fam.default_window)
    return sliding_pattern(num_layers, window, fam.window_period)


def _experts(fam: Family, get: Any, names: set[str]) -> tuple[int, int]:
    has_experts = "blk.0.ffn_gate_inp.weight" in names
    if fam.moe and not has_experts:
        raise ModelLoadError("GGUF declares a mixture of experts but has no blk.0.ffn_gate_inp tensor")
    if not has_experts:
        return 0, 0
    gating = int(get("expert_gating_func", _SOFTMAX_GATING) or _SOFTMAX_GATING)
    if gating != _SOFTMAX_GATING:
        raise ModelLoadError(f"expert gating function {gating} is not implemented (softmax only)")
    return int(get("expert_count", 0)), int(get("expert_used_count", 0))


def from_gguf_fields(meta: dict[str, Any], names: set[str] | frozenset[str],
                     rope_tensors: Mapping[str, Sequence[float]] | None = None) -> ModelConfig:
    """A config from GGUF metadata (key -> python value), the file's tensor names, and
    its RoPE tensors (rope_factors_long/short as lists of floats; rope_freqs the loader
    applies itself)."""
    arch = str(meta.get("general.architecture", ""))
    fam = family(arch)

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    required = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
    missing = [k for k in required if get(k) is None]
    if missing:
        raise ModelLoadError(f"GGUF metadata lacks {', '.join(f'{arch}.{k}' for k in missing)}")
    dim, num_layers = int(get("embedding_length")), int(get("block_count"))
    num_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", 0) or dim // num_heads)
    context = int(get("context_length", 4096))
    num_experts, num_used = _experts(fam, get, names)
    attn_cap, final_cap = (float(get("attn_logit_softcapping", fam.softcaps[0]) or 0.0),
                           float(get("final_logit_softcapping", fam.softcaps[1]) or 0.0))
    tokens = meta.get("tokenizer.ggml.tokens")
    eos_ids = tuple(dict.fromkeys(int(t) for t in (meta.get("tokenizer.ggml.eos_token_id"),
                                                   meta.get("tokenizer.ggml.eot_token_id")) if t is not None))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        vocab_size=int(get("vocab_size", 0) or (len(tokens) if tokens is not None else 0)),
        dim=dim, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)), head_dim=head_dim,
        ffn_dim=int(get("expert_feed_forward_length", 0) or get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=gguf_rope_scaling(get, context, rope_tensors or {}),
        rope_dim=int(get("rope.dimension_count", head_dim) or head_dim) % head_dim,   # whole head: 0
        rope_theta_local=float(get("rope.freq_base_swa", 0.0) or fam.local_rope_theta),
        rms_eps=float(get(fam.norm_eps_key, 1e-5)), norm=fam.norm,
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names or "blk.0.attn_qkv.bias" in names,
        o_bias="blk.0.attn_output.bias" in names, mlp_bias=fam.biases,
        qk_norm=fam.qk_norm, sandwich_norms=fam.sandwich_norms, activation=fam.activation,
        gated_mlp=fam.gated_mlp, fused_qkv="blk.0.attn_qkv.weight" in names, fused_gate_up=fam.fused,
        embed_scale=math.sqrt(dim) if fam.scale_embeddings else 1.0,
        attn_scale=1 / math.sqrt(dim / num_heads) if num_layers in fam.wide_query_scale_layers else 0.0,
        attn_softcap=attn_cap, final_softcap=final_cap,
        layer_windows=_windows(fam, get, num_layers),
        num_experts=num_experts, num_experts_used=num_used, max_context=context,
        bos_id=int(bos) if bos is not None else None, eos_ids=eos_ids, arch=arch)
