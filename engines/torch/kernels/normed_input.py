"""The residual add and RMSNorm before a projection, computed where the projection reads x.

A pre-norm layer runs `x, h = x + addend, rms_norm(x + addend)` and then projects h
(q/k/v, gate/up). Eager on the GPU that add and norm are one launch of their own
(`fused_small.add_rms_norm`); in a SmolLM2-135M step, bound by launches rather than bytes
(~7 kernels a layer of ~4 us each in its CUDA graph, its weights read in ~30 us), they are
two of the seven. Here the float matvec does them in its prologue: each program sums the
squares of bf16(residual + addend) over the row (K is small where this is used: the row is
re-read from L2 by every program), then its x loads return bf16(s * inv * weight) as the
separate kernel wrote h; program (0, 0) stores s, the residual stream the layer goes on
with. The same values but for the order of the sum of squares (one float32 rounding).

Only at one row of x (batch 1, where the step is launch-bound) and small K
(`MAX_NORMED_K`): past that the re-reads cost more than the launch they save.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engines.torch.kernels.gated_input import load_x
from engines.torch.kernels.quant_decode import tl, triton

# Widest row the prologue reads per program: every program of the projection re-reads the row
# (2 x K bf16) from L2, so past a few thousand the re-reads cost more than the launch saved.
MAX_NORMED_K = 2048
NORM_BLOCK = 256      # the sum of squares' tile


@dataclass
class PendingNorm:
    """residual + addend, to be RMSNorm'd (weight, eps) by the projection that reads it;
    total: where the kernel stores residual + addend (the stream the layer goes on with)."""
    residual: torch.Tensor
    addend: torch.Tensor
    weight: torch.Tensor
    eps: float
    total: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.total = torch.empty_like(self.residual, memory_format=torch.contiguous_format)

    def fits(self, rows_of_x: int) -> bool:
        """Whether a projection's prologue can take it: one row, K up to MAX_NORMED_K, alike tensors."""
        k = self.residual.shape[-1]
        return (rows_of_x == 1 and k <= MAX_NORMED_K and self.addend.shape == self.residual.shape
                and self.addend.dtype == self.residual.dtype and self.weight.shape == (k,))

    def kernel_args(self, rows_of_x: int, k: int) -> dict:
        """The float matvec's NORM arguments."""
        if not self.fits(rows_of_x) or self.residual.shape[-1] != k:
            raise ValueError(f"a normed prologue takes one row of at most {MAX_NORMED_K}: got {rows_of_x} "
                             f"rows of {self.residual.shape[-1]} for in_features {k}")
        return dict(add_ptr=self.addend.contiguous(), norm_w_ptr=self.weight.contiguous(), sum_ptr=self.total,
                    eps=float(self.eps), NORM=True)


if triton is not None:
    @triton.jit
    def row_norm_inverse(res_ptr, add_ptr, sum_ptr, K, eps, write_sum, BLOCK: tl.constexpr):
        """1 / rms(bf16(residual + addend)) over K (the rounding torch's add does); where
        write_sum, the rounded sum is stored at sum_ptr too."""
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            s = (tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                 + tl.load(add_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(sum_ptr.dtype.element_ty)
            if write_sum:
                tl.store(sum_ptr + offs, s, mask=mask)
            sf = s.to(tl.float32)
            acc += sf * sf
        return 1.0 / tl.sqrt(tl.sum(acc, axis=0) / K + eps)

    @triton.jit
    def load_input(x_ptr, off, mask, up_offset, GATE: tl.constexpr, NORM: tl.constexpr,
                   add_ptr, norm_w_ptr, inv):
        """A projection's x at off, float32: as stored (gated_input.load_x, GATE included), or
        with NORM, the RMSNorm of residual (x_ptr) + addend, rounded as the norm kernel wrote it."""
        if NORM:
            s = (tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
                 + tl.load(add_ptr + off, mask=mask, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
            w = tl.load(norm_w_ptr + off, mask=mask, other=0.0).to(tl.float32)
            return (s.to(tl.float32) * inv * w).to(x_ptr.dtype.element_ty).to(tl.float32)
        return load_x(x_ptr, off, mask, up_offset, GATE)
else:   # no Triton here: nothing launches these (the callers check for triton first)
    row_norm_inverse = load_input = None
