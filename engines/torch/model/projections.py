"""How a layer's projections are applied to their input, which may be a deferred norm.

After a pre-norm, x reaches the projections as a `NormedInput` where the model runs
eager on the GPU (norms.add_then_norm, defer): a quantized projection's decode kernel
reads the norm itself (engines/torch/kernels/normed_input.py), any other gets it
computed once. Projections that read one x (q, k, v) go through `linears_on`, which lets
quantized ones of different types run as one launch (kernels/quant_group.py).
"""
from __future__ import annotations

import torch
from torch import nn

from engines.torch.kernels.normed_input import NormedInput


def linear_on(linear: nn.Module, x: torch.Tensor | NormedInput) -> torch.Tensor:
    """linear(x) where x may be a deferred norm: a projection with a `normed` method (a
    quantized one: its decode kernel reads the norm) takes it as it is; any other gets it
    computed (once for all the consumers of one norm)."""
    if not isinstance(x, NormedInput):
        return linear(x)
    fused = getattr(linear, "normed", None)
    return fused(x) if fused is not None else linear(x.materialize())


def linears_on(linears: tuple[nn.Module, ...], x: torch.Tensor | NormedInput) -> list[torch.Tensor]:
    """[linear(x) for each linear]: one launch for all where their class groups them (a
    quantized projection's `group`: quant_ops.qlinear_group), else one each."""
    group = getattr(type(linears[0]), "group", None)
    if group is not None and all(type(linear) is type(linears[0]) for linear in linears):
        outs = group(linears, x)
        if outs is not None:
            return outs
    return [linear_on(linear, x) for linear in linears]
