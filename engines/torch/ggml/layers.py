"""The model's layers as llama.cpp's CPU backend computes them, bit for bit.

Subclasses of engines.torch.model.model's modules, swapped in by ggml_numerics.install
after a GGUF model is built (model.py stays one class for every path). Each one
reproduces one ggml op, checked against llama.cpp 0.3.36's own intermediate
tensors on SmolLM2-135M (zero difference):

- `GgmlRMSNorm`: ggml_compute_forward_rms_norm_f32.
- `GgmlRotary`: the rope cache (angles by repeated multiplication, glibc cosf/sinf).
- `GgmlAttention`: RoPE as ggml_rope applies it, pairs (2i, 2i+1) for the
  llama-family files whose Q/K rows convert_hf_to_gguf.py permuted (so q and k
  are taken back to the file's order, which also fixes the order attention sums
  in), pairs (i, i + d/2) otherwise (NEOX); x0*cos - x1*sin as one fma, as the
  compiler contracted it.
- `GgmlMLP`: ggml_vec_swiglu_f32, ggml_v_silu(gate) * up.
"""
from __future__ import annotations

import torch
from torch import nn

import dataclasses

from engines.torch.ggml.attention import ggml_attention
from engines.torch.model.attention import KVAccess
from engines.torch.ggml.math import fma, rope_cos_sin, silu
from engines.torch.model.model import MLP, Attention, RMSNorm, Rotary
from engines.torch.model.rope import RopeScaling

_MIN_ROPE_TABLE = 1024


class GgmlRMSNorm(RMSNorm):
    """float64 sum of float32 squares in order (cumsum: a pairwise float64 sum
    changed the last bit on 3 of 12 tokens next to SmolLM2's ~1e4 outlier
    activations), float32 mean, scale = 1.0f / sqrtf(mean + eps), x * scale * w."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        total = torch.cumsum((xf * xf).double(), dim=-1)[..., -1:]
        mean = (total / torch.full_like(total, xf.shape[-1])).float()
        # sqrt through float64: torch's float32 sqrt on this CPU was an ulp off sqrtf
        # on 3 of 12 rows (float64 rounded to float32 is sqrtf exactly).
        root = torch.sqrt((mean + self.eps).double()).float()
        scale = torch.ones_like(root) / root      # `1.0 / t` is not always a true division
        return (xf * scale * self.weight.float()).to(x.dtype)


class GgmlRotary(Rotary):
    """cos, sin [B, 1, T, D/2] from a table that grows with the positions asked for."""

    def __init__(self, head_dim: int, rope_theta: float, freq_scale: float = 1.0) -> None:
        nn.Module.__init__(self)
        self.half = head_dim // 2
        # powf(base, -2/n_dims), correctly rounded (as glibc's powf gave it here)
        self.theta_scale = float(torch.tensor(rope_theta ** (-2.0 / head_dim), dtype=torch.float32))
        self.freq_scale = freq_scale
        self.scaling = RopeScaling("linear", 1.0 / freq_scale) if freq_scale != 1.0 else RopeScaling()
        self.freq_factors = None
        self._cos = self._sin = torch.empty(0, self.half)

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        """rope_freqs.weight: ggml divides each angle by its factor."""
        self.freq_factors = factors.detach().cpu().float().numpy()
        self._cos = self._sin = torch.empty(0, self.half)

    def _table(self, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if needed > self._cos.shape[0]:
            size = max(_MIN_ROPE_TABLE, 1 << (needed - 1).bit_length())
            self._cos, self._sin = rope_cos_sin(size, self.half, self.theta_scale, self.freq_scale,
                                                self.freq_factors)
        return self._cos, self._sin

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._table(int(positions.max()) + 1)
        idx = positions.cpu()
        return (cos[idx].unsqueeze(1).to(positions.device),            # [B, 1, T, D/2]
                sin[idx].unsqueeze(1).to(positions.device))


def _file_order(head_dim: int) -> torch.Tensor:
    """Index taking a head's HF-ordered dims to the GGUF file's interleaved order."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


class GgmlAttention(Attention):
    def __init__(self, attn: Attention, interleaved: bool) -> None:
        nn.Module.__init__(self)
        self.layer, self.num_heads, self.num_kv, self.head_dim = (attn.layer, attn.num_heads,
                                                                  attn.num_kv, attn.head_dim)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.qkv_proj = None
        assert attn.spec.is_plain, "llama.cpp numerics: plain attention only"
        # ggml's attention over the f16 cache in place of SDPA (model/attention.py runs it).
        self.spec = dataclasses.replace(attn.spec, attention=ggml_attention)
        self.q_norm, self.k_norm = None, None
        self.interleaved = interleaved
        self.register_buffer("order", _file_order(self.head_dim), persistent=False)

    def fuse(self) -> None:
        raise NotImplementedError("llama.cpp numerics keep q/k/v apart (as llama.cpp does)")

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D] -> roped; interleaved pairs (2i, 2i+1) or halves (i, i + D/2)."""
        if self.interleaved:
            x = x.index_select(-1, self.order)
            x0, x1 = x[..., 0::2], x[..., 1::2]
        else:
            half = self.head_dim // 2
            x0, x1 = x[..., :half], x[..., half:]
        out0 = fma(x0, cos, -(x1 * sin))
        out1 = fma(x0, sin, x1 * cos)
        if self.interleaved:
            return torch.stack((out0, out1), dim=-1).flatten(-2)
        return torch.cat((out0, out1), dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, positions: torch.Tensor, kv: KVAccess) -> torch.Tensor:
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)        # [B, H, T, D], file order
        return kv.attend(self.layer, q, k, v, positions, self.spec)


class GgmlMLP(MLP):
    def __init__(self, mlp: MLP) -> None:
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.gate_up_proj = None

    def fuse(self) -> None:
        raise NotImplementedError("llama.cpp numerics keep gate/up apart (as llama.cpp does)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu(self.gate_proj(x).float()) * self.up_proj(x).float())
