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
from engines.torch.kernels.normed_input import PendingNorm


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


def add_then_norm(norm: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)): a residual add and the norm that reads it, in one
    launch where an RMSNorm runs eager on the GPU (fused_small), else as two ops."""
    if type(norm) is RMSNorm and fused_small.usable(x) and delta.shape == x.shape and delta.dtype == x.dtype:
        return fused_small.add_rms_norm(x, delta, norm.weight, norm.eps)
    total = x + delta
    return total, norm(total)


class NormAhead:
    """norm(x + delta) (norm(x) where delta is None) for the projection that reads it next.

    Why not just compute it: eager on the GPU, a quantized projection's float matvec can do
    the add and the RMSNorm in its x loads (kernels/normed_input.py), one launch a norm fewer
    in a step bound by launches (a small model's batch 1). `project(linear)` lets it; any other
    reader takes `value()`, computed once (add_then_norm). `residual()` is x + delta either way:
    the stream the layer goes on with."""

    def __init__(self, norm: nn.Module, x: torch.Tensor, delta: torch.Tensor | None) -> None:
        self.norm, self.x, self.delta = norm, x, delta
        self._total: torch.Tensor | None = None if delta is not None else x
        self._normed: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def value(self) -> torch.Tensor:
        if self._normed is None:
            if self.delta is None:
                self._normed = self.norm(self.x)
            else:
                self._total, self._normed = add_then_norm(self.norm, self.x, self.delta)
        return self._normed

    def residual(self) -> torch.Tensor:
        if self._total is None:
            self.value()
        return self._total

    def project(self, linear: nn.Module) -> torch.Tensor:
        """linear(self.value()), the add and norm inside linear's kernel where it can take them."""
        if self._normed is None and self.delta is not None and self._prologue_fits():
            pending = PendingNorm(self.x, self.delta, self.norm.weight, self.norm.eps)
            y = linear.normed(pending) if hasattr(linear, "normed") else None
            if y is not None:
                self._total = pending.total.view(self.x.shape)
                return y
        return linear(self.value())

    def _prologue_fits(self) -> bool:
        return (type(self.norm) is RMSNorm and fused_small.usable(self.x) and self.delta.shape == self.x.shape
                and self.delta.dtype == self.x.dtype)


def normed_value(x: torch.Tensor | NormAhead) -> torch.Tensor:
    """The tensor a module reads, whether handed a NormAhead or the normed tensor itself."""
    return x.value() if isinstance(x, NormAhead) else x


def project(linear: nn.Module, x: torch.Tensor | NormAhead) -> torch.Tensor:
    """linear(x), with x's norm in linear's kernel where x is a NormAhead that allows it."""
    return x.project(linear) if isinstance(x, NormAhead) else linear(x)


# ModelConfig.norm -> the class
NORM_CLASSES: dict[str, type[nn.Module]] = {"rms": RMSNorm, "layer": LayerNorm}


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return NORM_CLASSES[kind](dim, eps)
