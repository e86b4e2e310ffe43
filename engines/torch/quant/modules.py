"""`QuantLinear`, `QuantEmbedding` and `QuantExperts`: nn.Modules whose weight is a `QuantWeight`.

They replace nn.Linear / nn.Embedding by name (engines.torch.quant.adopt), so
the model's forward is the same code for dense and quantized weights. A
`QuantWeight` is not a Parameter: `LlamaModel.weight_bytes()` counts it through
`quant_weights()`, once per object (a tied output head shares the embedding's).

On the CPU a `QuantLinear` dequantizes its weight once, at its first forward,
and keeps the float copy (`dense`): the reference `qlinear` dequantizes the
whole matrix on every call, which on the 2-core build machine took ~0.2 s per
SmolLM2 MLP matrix, ~25 s a forward (measured 2026-12-05, under load). The CPU
is not where VRAM is scarce, and the copy is counted in `weight_bytes()`.
On CUDA nothing is cached: the kernels read the blocks.
"""
from __future__ import annotations

import torch
from torch import nn

from engines.torch.kernels.quant_experts import qmatvec_experts
from engines.torch.kernels.normed_input import NormedInput
from engines.torch.kernels.quant_ops import gated_activation, qlinear, qlinear_gated, qlinear_group, qlinear_normed
from engines.torch.kernels.quant_weight import QuantWeight


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias), W in GGUF blocks. `dtype`: the model's compute dtype."""

    def __init__(self, qweight: QuantWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.dtype = dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dense: torch.Tensor | None = None      # CPU only: see the module docstring

    def forward(self, x: torch.Tensor) -> torch.Tensor:                  # [..., in] -> [..., out]
        if self.qweight.device.type != "cpu":
            return qlinear(x, self.qweight, self.bias)
        if self.dense is None:
            self.dense = self.qweight.dequantize(self.dtype)
        return nn.functional.linear(x, self.dense.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def gated(self, h: torch.Tensor, kind: str) -> torch.Tensor:
        """self(act(gate) * up) for h = [..., gate | up]: on the GPU the decode kernels compute
        the activation as they read x (quant_ops.qlinear_gated)."""
        if self.qweight.device.type != "cpu":
            return qlinear_gated(h, self.qweight, self.bias, kind)
        return self(gated_activation(h, kind))

    def normed(self, h: NormedInput) -> torch.Tensor:
        """self(rms_norm(x + delta)) for a deferred norm: on the GPU the decode kernel reads
        the norm itself (quant_ops.qlinear_normed)."""
        if self.qweight.device.type != "cpu":
            return qlinear_normed(h, self.qweight, self.bias)
        return self(h.materialize())

    @staticmethod
    def group(linears: tuple[QuantLinear, ...], x: torch.Tensor | NormedInput) -> list[torch.Tensor] | None:
        """[linear(x) for each] as one launch where the GPU's decode kernels can (projections of
        one x in different types: quant_ops.qlinear_group), else None."""
        if linears[0].qweight.device.type == "cpu":
            return None
        return qlinear_group(x, [linear.qweight for linear in linears], [linear.bias for linear in linears])

    def cache_bytes(self) -> int:
        return 0 if self.dense is None else self.dense.numel() * self.dense.element_size()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, ggml={self.qweight.type_name}")


class QuantEmbedding(nn.Module):
    """Token embedding over a QuantWeight [vocab, dim]: dequantizes the looked-up rows only."""

    def __init__(self, qweight: QuantWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.qweight = qweight
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:                # [B, T] -> [B, T, dim]
        return self.qweight.rows(ids, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, ggml={self.qweight.type_name}"


class QuantExperts(nn.Module):
    """E stacked experts [E, out, in] in GGUF blocks, one QuantWeight of E * out rows (the
    file's order), where an ExpertWeights stood. On CUDA `pairs` runs each (token, expert)
    pair's matvec (quant_experts.py) and `expert(e)` is one expert's rows for qlinear; on
    the CPU `weight` is the dense stack, dequantized once (as QuantLinear does)."""

    def __init__(self, qweight: QuantWeight, num_experts: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.qweight, self.num_experts, self.dtype = qweight, num_experts, dtype
        self.out_features, self.in_features = qweight.shape[0] // num_experts, qweight.shape[1]
        self.dense: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """[E, out, in] in the model's dtype: kept on the CPU; on CUDA a transient copy (the
        fallback for rows the kernels cannot read)."""
        if self.dense is not None:
            return self.dense
        dense = self.qweight.dequantize(self.dtype).view(self.num_experts, self.out_features, self.in_features)
        if self.qweight.device.type == "cpu":
            self.dense = dense
        return dense

    def expert(self, index: int) -> QuantWeight:
        return self.qweight.row_slice(index * self.out_features, (index + 1) * self.out_features)

    def pairs(self, x: torch.Tensor, ids: torch.Tensor, x_div: int, gated: str | None = None) -> torch.Tensor:
        return qmatvec_experts(x, self.qweight, self.num_experts, ids, x_div, gated)

    def cache_bytes(self) -> int:
        return 0 if self.dense is None else self.dense.numel() * self.dense.element_size()

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, ggml={self.qweight.type_name}")


def quant_weights(model: nn.Module) -> list[QuantWeight]:
    """Every QuantWeight a model holds, each once."""
    seen: dict[int, QuantWeight] = {}
    for module in model.modules():
        qweight = getattr(module, "qweight", None)
        if isinstance(qweight, QuantWeight):
            seen.setdefault(id(qweight), qweight)
    return list(seen.values())


def quant_cache_bytes(model: nn.Module) -> int:
    """Bytes of the CPU's dequantized copies (QuantLinear.dense, QuantExperts.dense)."""
    return sum(m.cache_bytes() for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts)))
