"""A layer's self-attention: projections, per-head q/k norms, and the KV access call.

Projections are `nn.Linear` under HF names (q_proj, k_proj, v_proj, o_proj, or
one qkv_proj where the file fuses them: Phi-3), so a quantized loader swaps
them by name. The layer's own attention math (query scale, soft-cap, sliding
window, partial RoPE) travels as an `AttnSpec` to the KVAccess, which applies
it in whichever kernel it runs (engines.torch.model.attention, the Triton
decode kernel).
"""
from __future__ import annotations

import torch
from torch import nn

from engines.torch.model.attention import AttnSpec, KVAccess
from engines.torch.model.configs import ModelConfig
from engines.torch.model.mlp import can_fuse, fused_linear
from engines.torch.kernels.normed_input import NormedInput
from engines.torch.model.norms import RMSNorm, norm_pair
from engines.torch.model.projections import linear_on, linears_on


def layer_spec(cfg: ModelConfig, layer: int) -> AttnSpec:
    return AttnSpec(scale=cfg.attn_scale, softcap=cfg.attn_softcap, window=cfg.window(layer),
                    rope_dim=cfg.rope_dim if cfg.rotary_dim < cfg.head_dim else 0)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.spec = layer_spec(cfg, layer)
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj: nn.Linear | None = None     # from the file (Phi-3) or fuse(): one GEMM, not three
        if cfg.fused_qkv:
            self.qkv_proj = nn.Linear(cfg.dim, q_width + 2 * kv_width, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(cfg.dim, q_width, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(cfg.dim, kv_width, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.dim, kv_width, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_width, cfg.dim, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps) if cfg.qk_norm else None

    def fuse(self) -> None:
        if self.qkv_proj is None and can_fuse(self.q_proj, self.k_proj, self.v_proj):
            self.qkv_proj = fused_linear(self.q_proj, self.k_proj, self.v_proj)
            del self.q_proj, self.k_proj, self.v_proj

    def project(self, x: torch.Tensor | NormedInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of x, which may be a deferred norm (projections.py)."""
        if self.qkv_proj is None:
            q, k, v = linears_on((self.q_proj, self.k_proj, self.v_proj), x)
            return q, k, v
        kv_width = self.num_kv * self.head_dim
        return linear_on(self.qkv_proj, x).split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)

    def forward(self, x: torch.Tensor | NormedInput, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, kv: KVAccess) -> torch.Tensor:
        bsz, t, _ = x.shape
        q, k, v = self.project(x)
        q = q.reshape(bsz, t, self.num_heads, self.head_dim)
        k = k.reshape(bsz, t, self.num_kv, self.head_dim)
        if self.q_norm is not None:          # Qwen3, Gemma 3: per head, before RoPE
            q, k = norm_pair(self.q_norm, q, self.k_norm, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.reshape(bsz, t, self.num_kv, self.head_dim).transpose(1, 2)
        out = self.attend(q, k, v, cos, sin, positions, kv)             # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(bsz, t, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, positions: torch.Tensor, kv: KVAccess) -> torch.Tensor:
        """RoPE, then attention over the cache. RoPE is the KVAccess's to apply here:
        the GPU decode kernel rotates q and k in place."""
        return kv.attend_rotary(self.layer, q, k, v, positions, cos, sin, self.spec)
