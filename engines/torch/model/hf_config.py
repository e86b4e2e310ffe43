"""A Hugging Face `config.json` -> `ModelConfig`, for every family the torch engine serves.

The keys differ by model_type (StarCoder2's `norm_epsilon`, Qwen3-MoE's
`moe_intermediate_size`, Gemma's `query_pre_attn_scalar`...); the family
traits come from the same table as GGUF files (families.FAMILIES), so a
folder and a GGUF of one model build the same config. Sliding windows follow
llama.cpp (families.py says which families it honours), so both engines
answer alike.
"""
from __future__ import annotations

import math
from typing import Any

from engines.errors import ModelLoadError
from engines.torch.model.configs import ModelConfig, sliding_pattern
from engines.torch.model.families import FAMILIES, Family
from engines.torch.model.rope import RopeScaling

# config.json model_type -> GGUF architecture (the FAMILIES key)
HF_ARCHS: dict[str, str] = {t: arch for arch, fam in FAMILIES.items() for t in fam.hf_model_types}


def _rope_scaling(raw: dict | None, cfg: dict[str, Any], rope_dim: int) -> RopeScaling:
    if not raw:
        return RopeScaling()
    kind = raw.get("rope_type") or raw.get("type") or "default"
    original = int(raw.get("original_max_position_embeddings")
                   or cfg.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 4096))
    factor = float(raw.get("factor") or cfg.get("max_position_embeddings", original) / original)

    def yarn() -> RopeScaling:
        default_mscale = 1.0 + 0.1 * math.log(factor) if factor > 1 else 1.0
        attention = float(raw.get("attention_factor") or default_mscale)
        return RopeScaling("yarn", factor, original_max_position=original,
                           beta_fast=float(raw.get("beta_fast", 32.0)), beta_slow=float(raw.get("beta_slow", 1.0)),
                           attn_factor=attention / default_mscale)

    def longrope() -> RopeScaling:
        default = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        long, short = tuple(raw["long_factor"]), tuple(raw["short_factor"])
        if len(long) != rope_dim // 2 or len(short) != rope_dim // 2:
            raise ModelLoadError(f"config.json: longrope factors must number {rope_dim // 2}")
        return RopeScaling("longrope", factor, original_max_position=original,
                           attn_factor=float(raw.get("attention_factor") or default),
                           long_factors=long, short_factors=short)

    table = {
        "llama3": lambda: RopeScaling(
            "llama3", factor, float(raw.get("low_freq_factor", 1.0)),
            float(raw.get("high_freq_factor", 4.0)), original),
        "linear": lambda: RopeScaling("linear", factor),
        "yarn": yarn, "longrope": longrope, "su": longrope,
        "default": RopeScaling,
    }
    if kind not in table:
        raise ModelLoadError(f"config.json: rope_scaling type {kind!r} is not supported "
                             f"(supported: {', '.join(table)})")
    return table[kind]()


def _windows(fam: Family, cfg: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    window = int(cfg.get("sliding_window") or 0) if fam.window_period else 0
    if fam.window_period == 1 and cfg.get("use_sliding_window") is False:
        return ()
    layer_types = cfg.get("layer_types")
    if window and layer_types:
        return tuple(window if t == "sliding_attention" else 0 for t in layer_types)
    period = int(cfg.get("sliding_window_pattern") or fam.window_period)
    return sliding_pattern(num_layers, window or fam.default_window, period)


def _experts(model_type: str, cfg: dict[str, Any]) -> tuple[int, int, int]:
    """(experts, used, expert ffn width) or zeros."""
    count = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if not count:
        return 0, 0, 0
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise ModelLoadError("config.json: dense layers among the expert layers are not implemented")
    width = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    return count, int(cfg["num_experts_per_tok"]), width


def from_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Build a config from a Hugging Face config.json dict."""
    model_type = cfg.get("model_type", "llama")
    if model_type not in HF_ARCHS:
        raise ModelLoadError(f"config.json: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(HF_ARCHS)})")
    arch = HF_ARCHS[model_type]
    fam = FAMILIES[arch]
    try:
        dim, num_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        num_layers = int(cfg["num_hidden_layers"])
        head_dim = int(cfg.get("head_dim") or dim // num_heads)
        rope_dim = int(head_dim * float(cfg.get("partial_rotary_factor", 1.0)))
        experts, used, expert_ffn = _experts(model_type, cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        bias = bool(cfg.get("use_bias", fam.biases))
        scalar = cfg.get("query_pre_attn_scalar")
        return ModelConfig(
            vocab_size=int(cfg["vocab_size"]), dim=dim, num_layers=num_layers,
            num_heads=num_heads, num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=head_dim, ffn_dim=expert_ffn or int(cfg["intermediate_size"]),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(cfg.get("rope_scaling"), cfg, rope_dim),
            rope_dim=rope_dim if rope_dim != head_dim else 0,
            rope_theta_local=float(cfg.get("rope_local_base_freq") or fam.local_rope_theta),
            rms_eps=float(cfg.get("rms_norm_eps") or cfg.get("norm_epsilon") or 1e-5), norm=fam.norm,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")) or bias,
            o_bias=bias, mlp_bias=bias or bool(cfg.get("mlp_bias", False)),
            qk_norm=fam.qk_norm, sandwich_norms=fam.sandwich_norms, activation=fam.activation,
            gated_mlp=fam.gated_mlp, fused_qkv=fam.fused, fused_gate_up=fam.fused,
            embed_scale=math.sqrt(dim) if fam.scale_embeddings else 1.0,
            attn_scale=1 / math.sqrt(float(scalar)) if scalar else 0.0,
            attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
            final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
            layer_windows=_windows(fam, cfg, num_layers),
            num_experts=experts, num_experts_used=used,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            max_context=int(cfg.get("max_position_embeddings", 4096)),
            bos_id=cfg.get("bos_token_id"), eos_ids=eos_ids, arch=arch)
    except KeyError as exc:
        raise ModelLoadError(f"config.json lacks {exc.args[0]!r}") from None
