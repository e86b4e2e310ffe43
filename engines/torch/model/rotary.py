"""The rotary module: cos and sin for the positions of a forward (engines.torch.model.rope
has the frequencies of every scaling kind and why)."""
from __future__ import annotations

import torch
from torch import nn

from engines.torch.kernels import rope_table
from engines.torch.model.rope import RopeScaling, magnitude_scale, scaled_inv_freq


class Rotary(nn.Module):
    """cos/sin computed from positions on the fly: no table sized to the context,
    and positions may be anything the serving side chooses (prefix reuse).
    Returns cos, sin [B, 1, T, head_dim]: dims past rope_dim get (1, 0)."""

    def __init__(self, head_dim: int, rope_dim: int, theta: float,
                 scaling: RopeScaling = RopeScaling(), max_context: int = 0) -> None:
        super().__init__()
        self.head_dim, self.rope_dim, self.scaling = head_dim, rope_dim, scaling
        inv = torch.tensor(scaled_inv_freq(theta, rope_dim, scaling), dtype=torch.float32)
        self.register_buffer("base_inv_freq", inv, persistent=False)
        self.register_buffer("inv_freq", inv.clone(), persistent=False)
        mscale = torch.ones(head_dim)
        mscale[:rope_dim] = magnitude_scale(scaling)
        self.register_buffer("mscale", mscale, persistent=False)                       # [D]
        self.fit_context(max_context)

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        """llama3-scaled GGUFs carry per-frequency divisors (rope_freqs.weight)."""
        self.inv_freq = self.base_inv_freq / factors.to(self.inv_freq.device, torch.float32)

    def fit_context(self, max_context: int) -> None:
        """LongRoPE: the long divisors where the context served exceeds the original
        one (as llama.cpp decides by its n_ctx), else the short ones."""
        s = self.scaling
        if s.kind != "longrope":
            return
        is_long = max_context > s.original_max_position
        factors = s.long_factors if is_long else s.short_factors
        self.set_freq_factors(torch.tensor(factors, dtype=torch.float32))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if rope_table.usable(positions):    # eager on the GPU: one launch, not six or seven
            return rope_table.rope_table(positions, self.inv_freq, self.mscale, self.head_dim)
        freqs = positions.unsqueeze(-1).float() * self.inv_freq          # [B, T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)                           # [B, T, R]
        if self.rope_dim < self.head_dim:                                 # angle 0 turns nothing
            emb = torch.nn.functional.pad(emb, (0, self.head_dim - self.rope_dim))
        emb = emb.unsqueeze(1)                                            # [B, 1, T, D]
        return emb.cos() * self.mscale, emb.sin() * self.mscale
