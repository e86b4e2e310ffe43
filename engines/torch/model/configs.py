"""Model shapes: one dataclass for every family, and a table of named configs.

`ModelConfig` is what the torch model needs to build itself. It comes from
three places: a name in `NAMED_CONFIGS` (synthetic weights for benchmarks,
gpt-fast's `transformer_configs` habit), a GGUF file's metadata
(engines.torch.model.families.from_gguf_fields), or a Hugging Face
`config.json` (engines.torch.model.hf_config.from_hf_config). Family
differences are fields, not subclasses (Qwen2's QKV bias, Qwen3's q/k norms,
Gemma's soft-caps and sliding layers, Phi-3's fused projections, StarCoder2's
LayerNorm, experts), so one model assembly serves them all; the per-family
knowledge of how a file states them lives in families.py.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from engines.errors import ModelLoadError
from engines.torch.model.rope import SCALING_KINDS, RopeScaling, scaled_inv_freq

NORMS = ("rms", "layer")                 # RMSNorm, or LayerNorm with bias (StarCoder2)
ACTIVATIONS = ("silu", "gelu_tanh")      # SwiGLU / GeGLU when gated, plain GELU MLP when not


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int                    # per expert where num_experts > 0
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_dim: int = 0               # dims of a head that rotate; 0: all (Phi-4-mini: 96 of 128)
    rope_theta_local: float = 0.0   # sliding layers' base, unscaled (Gemma 3: 10000); 0: rope_theta
    rms_eps: float = 1e-5           # the norms' epsilon, RMS or LayerNorm
    norm: str = "rms"
    tie_embeddings: bool = False
    qkv_bias: bool = False          # Qwen2/2.5, StarCoder2
    o_bias: bool = False            # StarCoder2
    mlp_bias: bool = False          # StarCoder2
    qk_norm: bool = False           # Qwen3, Gemma 3: RMSNorm over each head of q and k
    sandwich_norms: bool = False    # Gemma 2/3: norms after attention and after the MLP too
    activation: str = "silu"
    gated_mlp: bool = True          # False: up -> act -> down (StarCoder2)
    fused_qkv: bool = False         # Phi-3: one qkv_proj in the file
    fused_gate_up: bool = False     # Phi-3: one gate_up_proj in the file
    embed_scale: float = 1.0        # Gemma: sqrt(dim)
    attn_scale: float = 0.0         # query scale; 0: 1/sqrt(head_dim)
    attn_softcap: float = 0.0       # Gemma 2: cap * tanh(scores / cap); 0: none
    final_softcap: float = 0.0      # Gemma 2: the same on the logits
    layer_windows: tuple[int, ...] = ()   # per layer: sliding window in tokens, 0 global; (): all global
    num_experts: int = 0            # MoE (Mixtral, Qwen3-MoE): experts per layer
    num_experts_used: int = 0       # top-k
    norm_topk_prob: bool = True     # renormalize the top-k routing weights to sum 1
    max_context: int = 4096
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    arch: str = "llama"             # GGUF general.architecture (families.FAMILIES key)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "ffn_dim", "max_context")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"model config: {name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"model config: num_heads={self.num_heads} is not a multiple "
                                 f"of num_kv_heads={self.num_kv_heads}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ModelLoadError(f"model config: rope_dim={self.rotary_dim} must be even and "
                                 f"<= head_dim={self.head_dim}")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ModelLoadError(f"model config: {len(self.layer_windows)} layer windows for "
                                 f"{self.num_layers} layers")
        if self.num_experts and not 0 < self.num_experts_used <= self.num_experts:
            raise ModelLoadError(f"model config: {self.num_experts_used} experts used of "
                                 f"{self.num_experts}")
        for name, value, allowed in (("norm", self.norm, NORMS), ("activation", self.activation, ACTIVATIONS),
                                     ("rope scaling", self.rope_scaling.kind, SCALING_KINDS)):
            if value not in allowed:
                raise ModelLoadError(f"model config: {name} {value!r} is not one of {', '.join(allowed)}")

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim or self.head_dim

    @property
    def query_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def window(self, layer: int) -> int:
        """Sliding window of a layer in tokens (a key j is seen from p iff p - j < window); 0: global."""
        return self.layer_windows[layer] if self.layer_windows else 0

    def is_local(self, layer: int) -> bool:
        """Whether the layer uses the local RoPE base (Gemma 3's sliding layers)."""
        return bool(self.rope_theta_local) and self.window(layer) > 0

    @property
    def num_params(self) -> int:
        """Parameter count (weights only), for bandwidth limits and reports."""
        attn = self.dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = (3 if self.gated_mlp else 2) * self.dim * self.ffn_dim
        if self.num_experts:
            mlp = self.num_experts * mlp + self.num_experts * self.dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.num_layers * per_layer + self.dim + head

    @property
    def num_active_params(self) -> int:
        """Weights read per token: with experts, only the top-k of them."""
        if not self.num_experts:
            return self.num_params
        expert = 3 * self.dim * self.ffn_dim
        return self.num_params - self.num_layers * (self.num_experts - self.num_experts_used) * expert

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def sliding_pattern(num_layers: int, window: int, period: int) -> tuple[int, ...]:
    """llama.cpp's set_swa_pattern(period): layer i slides iff i % period < period - 1
    (Gemma 2: every other layer; Gemma 3: five of six); period 1: every layer."""
    if not window or not period:
        return ()
    return tuple(window if period == 1 or i % period < period - 1 else 0 for i in range(num_layers))


_LLAMA3_SCALING = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
# Phi-4-mini's LongRoPE: 48 divisor pairs (the values are the shape's, not the checkpoint's).
_PHI4_MINI_ROPE = RopeScaling("longrope", 32.0, original_max_position=4096,
                              attn_factor=math.sqrt(1 + math.log(32) / math.log(4096)),
                              long_factors=tuple(1.0 + 0.5 * i for i in range(48)),
                              short_factors=tuple(1.0 for _ in range(48)))

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
    "qwen2.5-coder-1.5b": ModelConfig(
        vocab_size=151936, dim=1536, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
        ffn_dim=8960, rope_theta=1000000.0, rms_eps=1e-6, tie_embeddings=True, qkv_bias=True,
        max_context=32768, bos_id=None, eos_ids=(151645, 151643), arch="qwen2"),
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, dim=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
        ffn_dim=18944, rope_theta=1000000.0, rms_eps=1e-6, tie_embeddings=False, qkv_bias=True,
        max_context=32768, bos_id=None, eos_ids=(151645, 151643), arch="qwen2"),
    "qwen3-8b": ModelConfig(
        vocab_size=151936, dim=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
        ffn_dim=12288, rope_theta=1000000.0, rms_eps=1e-6, qk_norm=True, max_context=40960,
        eos_ids=(151645, 151643), arch="qwen3"),
    "qwen3-30b-a3b": ModelConfig(
        vocab_size=151936, dim=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
        ffn_dim=768, num_experts=128, num_experts_used=8, rope_theta=1000000.0, rms_eps=1e-6,
        qk_norm=True, max_context=40960, eos_ids=(151645, 151643), arch="qwen3moe"),
    "gemma-3-12b": ModelConfig(
        vocab_size=262208, dim=3840, num_layers=48, num_heads=16, num_kv_heads=8, head_dim=256,
        ffn_dim=15360, rope_theta=1000000.0, rope_scaling=RopeScaling("linear", 8.0),
        rope_theta_local=10000.0, rms_eps=1e-6, tie_embeddings=True, qk_norm=True,
        sandwich_norms=True, activation="gelu_tanh", embed_scale=math.sqrt(3840),
        attn_scale=1 / math.sqrt(256), layer_windows=sliding_pattern(48, 1024, 6),
        max_context=131072, bos_id=2, eos_ids=(1, 106), arch="gemma3"),
    "phi-4-mini": ModelConfig(
        vocab_size=200064, dim=3072, num_layers=32, num_heads=24, num_kv_heads=8, head_dim=128,
        ffn_dim=8192, rope_theta=10000.0, rope_scaling=_PHI4_MINI_ROPE, rope_dim=96, rms_eps=1e-5,
        tie_embeddings=True, fused_qkv=True, fused_gate_up=True, max_context=131072,
        bos_id=199999, eos_ids=(199999, 200020), arch="phi3"),
}


def named_config(name: str) -> ModelConfig:
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise ModelLoadError(f"no named model config {name!r}; known: "
                             f"{', '.join(sorted(NAMED_CONFIGS))}") from None


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """Inverse RoPE frequencies [rotary_dim/2] of the global layers, with the config's scaling."""
    return scaled_inv_freq(cfg.rope_theta, cfg.rotary_dim, cfg.rope_scaling)
