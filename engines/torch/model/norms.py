"""Normalization layers by family: RMSNorm (most), LayerNorm with bias (StarCoder2).

Both normalize in float32 as llama.cpp and HF do (bf16 sums of squares drift)
and return the input's dtype. Gemma's "weight + 1" is not here: GGUF files
already hold the sum (convert_hf_to_gguf.py adds it) and the safetensors
loader adds it to HF checkpoints (families.Family.hf_norm_offset).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch.kernels import fused_small
from engines.torch.kernels.normed_input import NormedInput


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_small.usable(x):   # eager on the GPU: one launch, not nine
            return fused_small.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (HF names), computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


def add_then_norm(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor | None,
                  defer: bool = False) -> tuple[torch.Tensor, torch.Tensor | NormedInput]:
    """(x + delta, norm(x + delta)): a residual add and the norm that reads it, in one
    launch where an RMSNorm runs eager on the GPU (fused_small), else as two ops.
    delta None: (x, norm(x)). defer: the caller's projections take a NormedInput
    (projections.linear_on), so on the GPU the norm is left to the kernel that reads it
    (normed_input.py); the sum is written by whichever consumer runs first."""
    fusable = (type(norm) is RMSNorm and fused_small.usable(x)
               and (delta is None or (delta.shape == x.shape and delta.dtype == x.dtype)))
    if fusable and defer:
        h = NormedInput(x, delta, norm.weight, norm.eps)
        return h.sum, h
    if delta is None:
        return x, norm(x)
    if fusable:
        return fused_small.add_rms_norm(x, delta, norm.weight, norm.eps)
    total = x + delta
    return total, norm(total)


def norm_pair(norm_a: nn.Module, a: torch.Tensor, norm_b: nn.Module,
              b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm_a(a), norm_b(b)): the per-head q and k norms, one launch where both are RMSNorms
    of one eps run eager on the GPU (a layer's two fewer in a launch-bound decode step)."""
    if (type(norm_a) is RMSNorm and type(norm_b) is RMSNorm and norm_a.eps == norm_b.eps
            and fused_small.usable(a) and fused_small.usable(b) and a.shape[-1] == b.shape[-1]
            and a.dtype == b.dtype):
        return fused_small.rms_norm_pair(a, norm_a.weight, b, norm_b.weight, norm_a.eps)
    return norm_a(a), norm_b(b)


# ModelConfig.norm -> the class
NORM_CLASSES: dict[str, type[nn.Module]] = {"rms": RMSNorm, "layer": LayerNorm}


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return NORM_CLASSES[kind](dim, eps)
