"""Which norms write their output's int8 quants too (kernels/normed_quants.py says why).

A norm is marked where a projection reading its output takes the integer-dot matvec
at decode's one row of x (quant_dp4a.chosen) or is stacked experts on those kernels:
then the norm's launch writes the quants that matvec would have quantized in a launch
of its own. Elsewhere (float matvecs: SmolLM2's small rows; dense weights; the CPU)
nothing is marked and the norms write what they always did.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from engines.torch.kernels import quant_dp4a
from engines.torch.model.norms import RMSNorm
from engines.torch.quant.modules import QuantExperts, QuantLinear


def reads_integer_dots(module: nn.Module | None) -> bool:
    """Whether module quantizes its input for the integer-dot kernels at one row of x."""
    if isinstance(module, QuantLinear):
        return quant_dp4a.chosen(module.qweight, 1)
    if isinstance(module, QuantExperts):
        return quant_dp4a.supports(module.qweight, 1)
    return False


def _readers(owner: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    return [getattr(owner, name) for name in names if getattr(owner, name, None) is not None]


def _mark(norm: nn.Module, readers: list[nn.Module]) -> None:
    if type(norm) is RMSNorm:
        norm.quantize_output = any(reads_integer_dots(m) for m in readers)


def mark_quantized_norms(model: nn.Module) -> int:
    """Marks each RMSNorm of model (a LlamaModel, projections fused or not) whose output an
    integer-dot projection reads; returns how many were marked."""
    for layer in model.model.layers:
        _mark(layer.input_layernorm, _readers(layer.self_attn, ("qkv_proj", "q_proj", "k_proj", "v_proj")))
        mlp = layer.mlp
        mlp_readers = _readers(getattr(mlp, "experts", mlp), ("gate_up_proj", "gate_proj", "up_proj", "c_fc"))
        _mark(layer.pre_feedforward_layernorm if layer.sandwich else layer.post_attention_layernorm, mlp_readers)
    _mark(model.model.norm, [model.lm_head])
    return sum(1 for m in model.modules() if type(m) is RMSNorm and m.quantize_output)
