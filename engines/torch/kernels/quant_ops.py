"""`qlinear`: y = x @ W^T (+ bias) with W a `QuantWeight` kept in GGUF block form.

First version: the reference path (dequantize then matmul) everywhere; the
Triton matrix-vector (decode) and dequantize-tile (prefill) paths follow.
"""
from __future__ import annotations

import torch

from engines.torch.kernels.quant_weight import QuantWeight


def qlinear_reference(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize the whole weight and matmul in float32 (CPU path, checks)."""
    y = x.float() @ w.dequantize(torch.float32).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def qlinear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype."""
    return qlinear_reference(x, w, bias)
