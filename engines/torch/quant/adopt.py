"""Swap a meta-built model's Linears and embedding for quantized modules, by HF name.

`adopt(model, quant, dtype)`: quant maps parameter names (`...q_proj.weight`,
`lm_head.weight`, `model.embed_tokens.weight`, stacked `...experts.gate_proj.weight`)
to `QuantWeight`s. A name whose
module does not exist yet because the loader fused it (`self_attn.qkv_proj`,
`mlp.gate_up_proj`, concatenated raw rows of one type) first fuses that
parent on the meta device, so its bias (if any) is the concatenated one the
state brings. A tied output head shares the embedding's QuantWeight. What is
left (norms, biases, dense weights) is filled in by build_model as before.
"""
from __future__ import annotations

import torch
from torch import nn

from engines.torch.kernels.quant_weight import QuantWeight
from engines.torch.model.moe import ExpertWeights
from engines.torch.quant.modules import QuantEmbedding, QuantExperts, QuantLinear

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def _swap_linear(model: nn.Module, module_name: str, qweight: QuantWeight, dtype: torch.dtype) -> None:
    parent_name, _, attr = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, attr) or getattr(parent, attr) is None:
        parent.fuse()                       # the loader fused these rows: fuse the meta parent to match
    old = getattr(parent, attr)
    if isinstance(old, ExpertWeights):
        experts, out_features, in_features = old.weight.shape
        if (experts * out_features, in_features) != qweight.shape:
            raise ValueError(f"{module_name}: {qweight.type_name} experts of {qweight.shape} rows do not "
                             f"stack {experts} experts of {tuple(old.weight.shape[1:])}")
        setattr(parent, attr, QuantExperts(qweight, experts, dtype))
        return
    if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != qweight.shape:
        raise ValueError(f"{module_name}: a {qweight.type_name} weight of shape {qweight.shape} "
                         f"does not replace {old}")
    bias = None if old.bias is None else torch.empty(old.out_features, device="meta")
    setattr(parent, attr, QuantLinear(qweight, bias, dtype))


def adopt(model: nn.Module, quant: dict[str, QuantWeight], dtype: torch.dtype) -> set[str]:
    """Install quant into model (in place); returns the parameter names they stand for
    (build_model expects no dense tensor for those)."""
    taken: set[str] = set()
    for name, qweight in quant.items():
        if name == EMBED:
            model.model.embed_tokens = QuantEmbedding(qweight, dtype)
        else:
            _swap_linear(model, name.removesuffix(".weight"), qweight, dtype)
        taken.add(name)
    if model.cfg.tie_embeddings and EMBED in quant:
        model.lm_head = QuantLinear(quant[EMBED], None, dtype)
        taken.add(HEAD)
    return taken
