"""A Linear that multiplies as llama.cpp's CPU backend multiplies a GGUF weight.

`GgmlLinear` keeps the ordinary dequantized float32 weight (so state_dict,
weight_bytes and everything that reads `.weight` see the true weight) and, in
forward, computes what llama.cpp computes:

- Q4_1 and Q8_0 weights (the default model's): bit for bit, from the weight's
  own integers and block scales (engines.torch.ggml.dot, which says why bit
  for bit is what it takes), on activations quantized to Q8_1 / Q8_0 as
  llama.cpp does (engines.torch.ggml.quant);
- the other types in ggml_quant.VEC_DOT: the activation rounded the same way,
  then a float32 matmul on the dequantized weight (same values, torch's
  summation order);
- anything else (F32): a plain float32 matmul, as llama.cpp does.

Measured on SmolLM2-135M Q4_1 against llama.cpp 0.3.36 fed the same input rows
(cb_eval): the exact path gives llama.cpp's Q4_1 and Q8_0 projection outputs
with no difference at all; the rounding-only path was within ~1e-7 relative,
the plain float32 matmul off by up to 3e-3.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch.ggml.dot import block_dot
from engines.torch.ggml.quant import QK8, VEC_DOT, q8_blocks

EXACT_TYPES = frozenset({"Q4_1", "Q8_0"})   # kernels whose summation order ggml_dot reproduces


@dataclass(frozen=True)
class WeightBlocks:
    """A weight's own block data: ints [out, in/32, 32] int8, scales [out, in/32] float32,
    mins [out, in/32] float32 (Q4_1) or None."""
    ints: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None


class GgmlLinear(nn.Linear):
    """nn.Linear whose forward computes as llama.cpp does for `type_name`."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, type_name: str,
                 blocks: WeightBlocks | None = None) -> None:
        nn.Module.__init__(self)   # no fresh parameters: the loaded ones are adopted
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight, self.bias = weight, bias
        self.type_name = type_name
        self._round: Callable = VEC_DOT[type_name][0]
        self.is_exact = blocks is not None and type_name in EXACT_TYPES
        if self.is_exact:
            expected = (weight.shape[0], weight.shape[1] // QK8, QK8)
            if tuple(blocks.ints.shape) != expected:
                raise ValueError(f"{type_name} blocks {tuple(blocks.ints.shape)}, expected {expected}")
            if (type_name == "Q4_1") != (blocks.mins is not None):
                raise ValueError(f"{type_name}: block minimums are {'missing' if blocks.mins is None else 'unexpected'}")
        # lm_head only (set by ggml_numerics.install): exact where it decides, see _top_exact.
        self.exact_within: float | None = None
        # Not persistent: state_dict stays the model's own tensors.
        self.register_buffer("ints", blocks.ints if self.is_exact else None, persistent=False)
        self.register_buffer("scales", blocks.scales if self.is_exact else None, persistent=False)
        self.register_buffer("mins", blocks.mins if self.is_exact else None, persistent=False)

    @classmethod
    def wrap(cls, linear: nn.Linear, type_name: str, blocks: WeightBlocks | None = None) -> GgmlLinear:
        return cls(linear.weight, linear.bias, type_name, blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not self.is_exact:
            rounded = self._round(xf)
            rounded = rounded[0] if isinstance(rounded, tuple) else rounded
            return F.linear(rounded, self.weight, self.bias)
        rows = xf.reshape(-1, xf.shape[-1])                            # [T, in]
        q, d, s = q8_blocks(rows)                                      # [T, nb, 32], [T, nb] x2
        if self.exact_within is not None and self.mins is None:
            y = self._top_exact(q, d)
        else:
            y = block_dot(q, d, self.ints, self.scales, self.mins, s if self.mins is not None else None)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*xf.shape[:-1], self.out_features)

    def _top_exact(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """[T, out]: a float32 matmul on the same rounded activations (within ~1e-4
        of llama.cpp's sums), then llama.cpp's exact sums for every column within
        `exact_within` of a row's maximum: the argmax and the logits that sampling
        can pick are llama.cpp's bits. For a 49152-token vocabulary the exact
        sums for all columns cost as much as all 30 layers of SmolLM2-135M."""
        xq = (q * d.unsqueeze(-1)).reshape(q.shape[0], -1)
        y = F.linear(xq, self.weight)
        near = (y >= y.amax(-1, keepdim=True) - self.exact_within).any(0).nonzero().squeeze(1)
        y[:, near] = block_dot(q, d, self.ints[near], self.scales[near])
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ggml={self.type_name}{' exact' if self.is_exact else ''}"
