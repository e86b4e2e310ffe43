"""`qlinear`: y = x @ W^T (+ bias) with W a `QuantWeight` kept in GGUF block form.

Dispatch, on the rows M of x (all leading dims flattened):
- CUDA with Triton, a block type, M <= 8 (decode): `quant_kernels.qmatvec`,
  the memory-bound matrix-vector kernel that reads each quantized byte once.
- CUDA with Triton, M > 8 (prefill): dequantize W into a scratch buffer of x's
  dtype with the Triton dequantize kernel, then cuBLAS (`F.linear`). Measured
  against the Triton dequantize-tile matmul (`qmatmul_fused`) by
  benchmarks/quant_matvec.py: at prefill sizes the matmul is compute-bound, the
  dequantize pass costs one read of the quantized bytes and one write + read of
  bf16 (~0.1 ms for a 4096x14336 layer on an H100 against ~0.8 ms of matmul at
  M=4096), and cuBLAS's pipelined, warp-specialized Hopper kernels run well ahead
  of a Triton tile loop whose B operand goes through registers, not TMA.
  Big weights (the output head) are dequantized in row slices so the scratch
  stays under SCRATCH_WEIGHTS.
- F16/BF16/F32 weights: `F.linear` on the plain tensor.
- Elsewhere (CPU, no Triton, rows that are not whole 256-weight super-blocks):
  the reference path, the torch decoders of engines.torch.load.dequant and an
  fp32 matmul.

No path syncs with the host or sizes anything from device data, so all of them
run inside CUDA graphs; scratch comes from the caching allocator (the graph's
private pool during capture).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engines.torch.kernels import quant_kernels
from engines.torch.kernels.quant_weight import FLOAT_TYPES, QuantWeight

SCRATCH_WEIGHTS = 64 * 1024 * 1024   # 128 MiB of bf16: every layer of an 8B model in one piece


def qlinear_reference(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize the whole weight with the torch decoders and matmul in float32."""
    y = x.float() @ w.dequantize(torch.float32).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _row_slice(w: QuantWeight, start: int, stop: int) -> QuantWeight:
    return QuantWeight(w.type_name, (stop - start, w.shape[1]), {k: p[start:stop] for k, p in w.planes.items()})


def qmatmul_dequant(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N]: Triton dequantize into scratch of x's dtype, then a cuBLAS matmul, in row slices."""
    dtype = x.dtype
    bias = None if bias is None else bias.to(dtype)
    n, k = w.shape
    step = max(64, SCRATCH_WEIGHTS // k // 64 * 64)
    if step >= n:
        return F.linear(x, quant_kernels.dequantize(w, dtype), bias)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        part = quant_kernels.dequantize(_row_slice(w, start, stop), dtype)
        out[:, start:stop] = F.linear(x, part, None if bias is None else bias[start:stop])
    return out


def qlinear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype."""
    if w.type_name in FLOAT_TYPES:
        weight = w.planes["w"]
        return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype),
                        None if bias is None else bias.to(x.dtype))
    if not (x.is_cuda and quant_kernels.kernel_ready(w)):
        return qlinear_reference(x, w, bias)
    x2 = x.reshape(-1, w.shape[1])
    if x2.shape[0] <= quant_kernels.MAX_DECODE_ROWS:
        y = quant_kernels.qmatvec(x2, w, bias)
    else:
        y = qmatmul_dequant(x2, w, bias)
    return y.reshape(*x.shape[:-1], w.shape[0])
