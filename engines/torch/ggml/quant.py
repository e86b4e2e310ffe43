"""Activation rounding as llama.cpp's CPU backend does it before a quantized matmul.

llama.cpp never multiplies float activations by a quantized weight: it first
quantizes each activation row to the weight type's `vec_dot_type` (Q4_0, Q5_0,
Q8_0 weights -> Q8_0; Q4_1, Q5_1 -> Q8_1; K-quants -> Q8_K; F16 -> F16), then
takes integer dot products per block, scaled in float. The torch engine on the
CPU reproduces that rounding so it picks the same greedy tokens as llama.cpp
(tests/engines/test_model_greedy.py; the measurements are in its docstring).

Each function returns the activation *as llama.cpp sees it*, dequantized
(q * d), so an ordinary float32 matmul on the dequantized weight then gives
llama.cpp's result up to float32 summation order. Q8_1 also carries the
per-block sum s = fp16(d * sum(q)), which the Q4_1/Q5_1 dot product multiplies
by the weight's block minimum; `q8_1` returns the difference between that
rounded sum and the exact one, for ggml_linear to add back.

Rounding, checked against llama.cpp's own quantize_row_q8_1 (called through
ctypes on captured activation rows): q = round-half-even(x * (127.0f / amax)),
all in float32. Beware `127 / tensor` in torch: with a Python scalar numerator
it is not a correctly rounded division (an ulp off on ~1 block in 500 here),
and each such ulp can flip a q and move a projection's output by ~4e-4.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

QK8 = 32      # Q8_0 / Q8_1 block
QK_K = 256    # Q8_K block


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """[..., K] -> [..., K/size, size] (ValueError if K is not a multiple of size)."""
    if x.shape[-1] % size:
        raise ValueError(f"activation width {x.shape[-1]} is not a multiple of the block size {size}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _q8_ints(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [..., nb, 32] float32 -> (q [..., nb, 32] float32 integers in -127..127,
    d [..., nb] float32 = amax / 127 before fp16 rounding)."""
    amax = xb.abs().amax(-1, keepdim=True)                                   # [..., nb, 1]
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    inv = torch.full_like(amax, 127.0) / safe                                 # 127.0f / amax, exactly
    q = torch.round(xb * inv)                                                 # 0 where amax == 0
    return q, (amax / torch.full_like(amax, 127.0)).squeeze(-1)


def q8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] float32 -> the Q8_1 blocks llama.cpp stores: (q [..., K/32, 32] float32
    integers, d [..., K/32] fp16 values, s [..., K/32] = fp16(d * sum(q))). Q8_0 is the
    same without s."""
    q, d = _q8_ints(_blocks(x, QK8))
    return q, d.half().float(), (d * q.sum(-1)).half().float()


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 -> x rounded through Q8_0 blocks (q * fp16(d)), same shape."""
    q, d = _q8_ints(_blocks(x, QK8))
    return (q * d.half().float().unsqueeze(-1)).reshape(x.shape)


def q8_1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float32 -> (x through Q8_1 blocks, same shape; sum_error [..., K/32]).

    sum_error = fp16(d * sum(q)) - fp16(d) * sum(q): what llama.cpp's block sum s
    carries beyond the dequantized activation's own sum. A Q4_1/Q5_1 dot product
    adds min_w * s per block; ggml_linear adds sum_error @ mins.T."""
    q, d = _q8_ints(_blocks(x, QK8))
    d16 = d.half().float()
    total = q.sum(-1)                                                        # exact integers
    sum_error = (d * total).half().float() - d16 * total
    return (q * d16.unsqueeze(-1)).reshape(x.shape), sum_error


def q8_k(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 -> x rounded through Q8_K blocks of 256 (quantize_row_q8_K_ref:
    scale -127 / (the signed value of largest magnitude), d = 1 / scale in float32)."""
    xb = _blocks(x, QK_K)
    idx = xb.abs().argmax(-1, keepdim=True)                                   # first of equal maxima
    peak = xb.gather(-1, idx)                                                  # [..., nb, 1] signed
    safe = torch.where(peak != 0, peak, torch.ones_like(peak))
    scale = torch.where(peak != 0, torch.full_like(peak, -127.0) / safe, torch.zeros_like(peak))
    q = torch.round(scale * xb).clamp(max=127)
    d = torch.where(peak != 0, torch.ones_like(scale) / torch.where(peak != 0, scale, 1.0),
                    torch.zeros_like(scale))
    return (q * d).reshape(x.shape)


def f16(x: torch.Tensor) -> torch.Tensor:
    """F16 weights take their activations rounded to float16."""
    return x.half().float()


# GGML weight type -> (activation rounding, block width it needs, whether the weight's
# block minimum meets Q8_1's rounded sum). Types absent here multiply float32 as is (F32).
VEC_DOT: dict[str, tuple[Callable, int, bool]] = {
    "Q4_0": (q8_0, QK8, False),
    "Q5_0": (q8_0, QK8, False),
    "Q8_0": (q8_0, QK8, False),
    "Q4_1": (q8_1, QK8, True),
    "Q5_1": (q8_1, QK8, True),
    "Q2_K": (q8_k, QK_K, False),
    "Q3_K": (q8_k, QK_K, False),
    "Q4_K": (q8_k, QK_K, False),
    "Q5_K": (q8_k, QK_K, False),
    "Q6_K": (q8_k, QK_K, False),
    "F16": (f16, 1, False),
}
