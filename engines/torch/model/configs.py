"""Model shapes of the Llama family: one dataclass and a table of named configs.

`ModelConfig` is what the torch model needs to build itself. It comes from
three places: a name in `NAMED_CONFIGS` (synthetic weights for benchmarks,
gpt-fast's `transformer_configs` habit), a GGUF file's metadata
(`from_gguf_fields`), or a Hugging Face `config.json` (`from_hf_config`).
Family differences (Qwen2's QKV bias, tied embeddings, llama3 RoPE scaling)
are fields, not subclasses, so one model class serves them all.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from engines.errors import ModelLoadError


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. kind: "none", "linear" or "llama3" (Llama 3.1+)."""
    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False          # Qwen2/2.5
    max_context: int = 4096
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    arch: str = "llama"             # GGUF general.architecture / HF model_type family

    def __post_init__(self) -> None:
        positive = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "ffn_dim", "max_context")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"model config: {name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"model config: num_heads={self.num_heads} is not a multiple "
                                 f"of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim={self.head_dim} must be even for RoPE")

    @property
    def num_params(self) -> int:
        """Parameter count (weights only), for bandwidth limits and reports."""
        attn = self.dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.num_layers * per_layer + self.dim + head

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_LLAMA3_SCALING = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)

NAMED_CONFIGS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        ffn_dim=1536, rope_theta=100000.0, rms_eps=1e-5, tie_embeddings=True,
        max_context=8192, bos_id=1, eos_ids=(2,)),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
        ffn_dim=8192, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING, rms_eps=1e-5,
        tie_embeddings=True, max_context=131072, bos_id=128000, eos_ids=(128001, 128008, 128009)),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        ffn_dim=14336, rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        rms_eps=1e-5, tie_embeddings=False, max_context=131072, bos_id=128000,
        eos_ids=(128001, 128008, 128009)),
    "qwen2.5-0.5b": ModelConfig(
        vocab_size=151936, dim=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
        ffn_dim=4864, rope_theta=1000000.0, rms_eps=1e-6, tie_embeddings=True, qkv_bias=True,
        max_context=32768, bos_id=None, eos_ids=(151645, 151643), arch="qwen2"),
}

# The GGUF architectures this model implements; qkv bias is read from the tensors.
SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")


def named_config(name: str) -> ModelConfig:
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise ModelLoadError(f"no named model config {name!r}; known: "
                             f"{', '.join(sorted(NAMED_CONFIGS))}") from None


def _gguf_rope_scaling(get: Any) -> RopeScaling:
    kind = str(get("rope.scaling.type", "none") or "none")
    factor = float(get("rope.scaling.factor", 1.0) or 1.0)
    # llama3-scaled GGUFs store the per-frequency factors as a tensor
    # (rope_freqs.weight) instead of metadata; the loader hands those over.
    return RopeScaling(kind="linear" if kind == "linear" and factor != 1.0 else "none",
                       factor=factor)


def from_gguf_fields(meta: dict[str, Any], has_qkv_bias: bool, has_output: bool) -> ModelConfig:
    """Build a config from GGUF metadata (key -> python value)."""
    arch = str(meta.get("general.architecture", ""))
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported by the torch engine "
                             f"(supported: {', '.join(SUPPORTED_ARCHS)})")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    required = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
    missing = [k for k in required if get(k) is None]
    if missing:
        raise ModelLoadError(f"GGUF metadata lacks {', '.join(f'{arch}.{k}' for k in missing)}")
    dim = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0)
                   or dim // num_heads)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", 0) or (len(tokens) if tokens is not None else 0))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(int(t) for t in (eos, eot) if t is not None))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        vocab_size=vocab, dim=dim, num_layers=int(get("block_count")), num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)), head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(get),
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=not has_output, qkv_bias=has_qkv_bias,
        max_context=int(get("context_length", 4096)),
        bos_id=int(bos) if bos is not None else None, eos_ids=eos_ids, arch=arch)


def _hf_rope_scaling(raw: dict | None) -> RopeScaling:
    if not raw:
        return RopeScaling()
    kind = raw.get("rope_type") or raw.get("type") or "none"
    table = {
        "llama3": lambda: RopeScaling(
            "llama3", float(raw["factor"]), float(raw.get("low_freq_factor", 1.0)),
            float(raw.get("high_freq_factor", 4.0)),
            int(raw.get("original_max_position_embeddings", 8192))),
        "linear": lambda: RopeScaling("linear", float(raw["factor"])),
        "default": RopeScaling,
    }
    if kind not in table:
        raise ModelLoadError(f"config.json: rope_scaling type {kind!r} is not supported "
                             f"(supported: {', '.join(table)})")
    return table[kind]()


_HF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def from_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Build a config from a Hugging Face config.json dict."""
    model_type = cfg.get("model_type", "llama")
    if model_type not in _HF_ARCHS:
        raise ModelLoadError(f"config.json: model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(_HF_ARCHS)})")
    try:
        dim, num_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return ModelConfig(
            vocab_size=int(cfg["vocab_size"]), dim=dim, num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads, num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or dim // num_heads),
            ffn_dim=int(cfg["intermediate_size"]),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=_hf_rope_scaling(cfg.get("rope_scaling")),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            max_context=int(cfg.get("max_position_embeddings", 4096)),
            bos_id=cfg.get("bos_token_id"), eos_ids=eos_ids, arch=_HF_ARCHS[model_type])
    except KeyError as exc:
        raise ModelLoadError(f"config.json lacks {exc.args[0]!r}") from None


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """Inverse RoPE frequencies [head_dim/2], with the config's scaling applied.
    llama3 scaling follows Meta's reference (and HF's `_compute_llama3_parameters`)."""
    half = cfg.head_dim // 2
    inv = [1.0 / (cfg.rope_theta ** (2 * i / cfg.head_dim)) for i in range(half)]
    scaling = cfg.rope_scaling
    if scaling.kind == "linear":
        return [f / scaling.factor for f in inv]
    if scaling.kind != "llama3":
        return inv
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / scaling.factor)
        else:
            smooth = ((scaling.original_max_position / wavelen - scaling.low_freq_factor)
                      / (scaling.high_freq_factor - scaling.low_freq_factor))
            out.append((1 - smooth) * f / scaling.factor + smooth * f)
    return out
