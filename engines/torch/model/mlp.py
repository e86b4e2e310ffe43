"""The dense feed-forward blocks: gated (SwiGLU, GeGLU) and plain (StarCoder2's GELU MLP).

Every projection is an `nn.Linear` under its HF name, so the quantized-weights
loader can swap it for a QuantLinear by module name; the activation lives
outside the Linears. `fuse()` (GPU decode) merges gate and up into one GEMM;
Phi-3 files bring them merged already (`gate_up_proj`, gate rows first).
"""
from __future__ import annotations

import torch
from torch import nn

from engines.torch.kernels import fused_small
from engines.torch.kernels.activations import ACTIVATIONS   # ModelConfig.activation -> the function
from engines.torch.kernels.normed_input import NormedInput
from engines.torch.model.configs import ModelConfig
from engines.torch.model.projections import linear_on

__all__ = ["ACTIVATIONS", "MLP", "PlainMLP", "can_fuse", "fused_linear"]


def can_fuse(*parts: nn.Module) -> bool:
    """Dense Linears only: quantized ones are fused by the loader, on raw rows of one
    type (engines.torch.load.gguf_quant), or stay apart where their types differ."""
    return all(type(p) is nn.Linear for p in parts)


def fused_linear(*parts: nn.Linear) -> nn.Linear:
    """One Linear whose output is the parts' outputs side by side. Made on the meta device
    and given the parts' tensors: nn.Linear on the real device would allocate a weight of
    its own and fill it from torch's default generator, which fails while another model of
    the process captures a CUDA graph (engines/torch/serve/graph_capture.py)."""
    weight = torch.cat([p.weight for p in parts], dim=0)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=parts[0].bias is not None,
                      device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)). x may be a deferred norm (projections.py)."""

    TAKES_NORMED = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.act = ACTIVATIONS[cfg.activation]
        bias = cfg.mlp_bias
        self.gate_up_proj: nn.Linear | None = None   # from the file (Phi-3) or fuse()
        if cfg.fused_gate_up:
            self.gate_up_proj = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=bias)
        else:
            self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=bias)
            self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=bias)

    def fuse(self) -> None:
        if self.gate_up_proj is None and can_fuse(self.gate_proj, self.up_proj):
            self.gate_up_proj = fused_linear(self.gate_proj, self.up_proj)
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor | NormedInput) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(self.act(linear_on(self.gate_proj, x)) * linear_on(self.up_proj, x))
        gate_up = linear_on(self.gate_up_proj, x)
        if fused_small.usable(gate_up):   # eager on the GPU: one launch, not two
            if hasattr(self.down_proj, "gated"):   # quantized: none, the down projection's x loads do it
                return self.down_proj.gated(gate_up, self.activation)
            return self.down_proj(fused_small.gated_activation(gate_up, self.activation))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class PlainMLP(nn.Module):
    """c_proj(act(c_fc(x))): StarCoder2."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.c_fc = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def fuse(self) -> None:
        """Nothing to merge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))
