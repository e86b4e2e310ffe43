"""A residual add and RMSNorm, computed where the next projection's kernel reads its x.

A pre-norm layer runs `x, h = x + delta, rms_norm(x + delta) * g`, then projects h
(q|k|v, gate|up, the output head). Eager on the GPU that add + norm was a launch of
its own (`fused_small.add_rms_norm`), twice a layer: 60 of the 257 kernels of a
SmolLM2-135M decode step, which is bound by launches, not bytes
(benchmarks/results: decode_profile_q4km_smollm2_pdl_h100.json).

Here the float matvec (`quant_kernels.qmv_rows`, NORM) reads x and delta itself:
    y = rstd * sum_k W[n, k] * (s_k * g_k) (+ bias),  s = round(x + delta),
    rstd = 1 / sqrt(mean(s^2) + eps),
accumulating sum(s^2) in the same loop that reads s, so nothing waits for the norm
before the weights stream. Every program walks the whole of K (no K split), and
program 0 stores s: the residual stream the next add continues from. The dp4a path's
x quantization (`dp4a_kernels.quantize_x_kernel`, NORM), whose programs each hold a
part of a row, reads the row's sum of squares first (`row_rstd`), then quantizes
s * g * rstd; each program stores its part of s.

The one difference from the separate kernel: x is not rounded to the model's dtype
after the norm (the product stays float32 inside the kernel), so the result is a
little closer to exact, not bit-equal. tests/engines/test_normed_input.py bounds it
(tests/gpu/test_normed_input_gpu.py on CUDA).

`NormedInput` is the torch side: what a projection receives instead of h. A consumer
that has no such kernel calls `materialize()`, which runs the separate launch once,
writes the same `sum`, and caches h for the next consumer (q, k and v apart).
"""
from __future__ import annotations

import torch

from engines.torch.kernels import fused_small
from engines.torch.kernels.quant_decode import tl, triton


class NormedInput:
    """rms_norm(x + delta) * weight, not yet computed. `sum` is the residual x + delta (x
    itself without delta): whichever consumer runs first writes it."""

    def __init__(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> None:
        if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype):
            raise ValueError(f"NormedInput: the residual {tuple(x.shape)} {x.dtype} and the addend "
                             f"{tuple(delta.shape)} {delta.dtype} differ")
        self.x = x.contiguous()
        self.delta = None if delta is None else delta.contiguous()
        self.weight = weight.contiguous()
        self.eps = float(eps)
        self.sum = self.x if delta is None else torch.empty_like(self.x)
        self._normed: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def device(self) -> torch.device:
        return self.x.device

    def rows(self) -> int:
        """Rows of x with every leading dim flattened (the M of a matvec)."""
        return self.x.numel() // self.x.shape[-1]

    def kernel_args(self) -> dict:
        """What a kernel with NORM takes: the addend (x where there is none: never read then),
        the norm's weight, where the sum goes (flat, contiguous), eps and HAS_DELTA."""
        return dict(delta=self.x if self.delta is None else self.delta, g_ptr=self.weight, sum_ptr=self.sum,
                    eps=self.eps, NORM=True, HAS_DELTA=self.delta is not None)

    def materialize(self) -> torch.Tensor:
        """h itself, computed once (the separate kernel), `sum` written on the way."""
        if self._normed is None:
            if self.delta is None:
                self._normed = fused_small.rms_norm(self.x, self.weight, self.eps)
            else:
                _, self._normed = fused_small.add_rms_norm(self.x, self.delta, self.weight, self.eps,
                                                           total=self.sum)
        return self._normed


if triton is not None:
    @triton.jit
    def load_normed(x_ptr, delta_ptr, g_ptr, sum_ptr, off, g_off, mask, write, HAS_DELTA: tl.constexpr):
        """(s, s * g) at x_ptr + off in float32: s = x + delta rounded to x's dtype (as torch's
        add is), g the norm's weight at g_off. Stores s at sum_ptr + off where `write`."""
        s = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            d = tl.load(delta_ptr + off, mask=mask, other=0.0).to(tl.float32)
            s = (s + d).to(x_ptr.dtype.element_ty)
            if write:
                tl.store(sum_ptr + off, s, mask=mask)
            s = s.to(tl.float32)
        g = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        return s, s * g

    @triton.jit
    def row_rstd(x_ptr, delta_ptr, row_start, ROW, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        """1 / sqrt(mean(s^2) + eps) of the row of ROW values at row_start, s = x + delta rounded
        as load_normed rounds it: for kernels whose programs each hold a part of the row
        (the dp4a path's x quantization), so each reads the whole row first."""
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, ROW, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            live = cols < ROW
            s, _ = load_normed(x_ptr, delta_ptr, x_ptr, x_ptr, row_start + cols, cols, live, False, HAS_DELTA)
            acc += s * s
        return 1.0 / tl.sqrt(tl.sum(acc, axis=0) / ROW + eps)
else:   # no Triton here: nothing launches these (the callers check for triton first)
    load_normed = row_rstd = None
