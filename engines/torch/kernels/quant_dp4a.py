"""Q4_K matrix-vector at batch 1 on integer dot products, as llama.cpp's MMVQ does (issue 16).

Why: the float matvec of `quant_kernels` is instruction-bound, not memory-bound, on
4-bit types (~10 SASS instructions a weight for Q4_K on sm_90: x's bf16 unpack,
nibble extraction, the exponent trick, two FMAs), so an 8B Q4_K_M decode step
ran at 0.63x llama.cpp's CUDA build (benchmarks/results/quant_matvec.json).
llama.cpp's mmvq quantizes x once per call to int8 in blocks of 32 (q8_1: a
float scale and the block's scaled sum), then multiplies four 4-bit weights by
four int8 activations in one `dp4a` instruction: one 32-bit word of quants is
8 weights, two masks and one shift apart from two dp4a operands. Here:

    _quantize_x_kernel   x [K] -> int8 xq [K] (read as int32 words), dx [K/32], sx [K/32]
    _q4k_dp4a_kernel     y[n] = sum over sub-blocks s of 32 weights:
                         d*sc[s] * dx[s] * dot(q[s], xq[s])  -  dmin*m[s] * sx[s]

with q the Q4_K nibbles (0..15), sc/m the 6-bit scales and mins, d/dmin the
super-block's fp16 factors (ggml's block_q4_K), sx = dx * sum(xq) (ggml's q8_1
"s"). A word of the quants plane holds bytes 4i..4i+3 of a 32-byte group g of a
super-block: low nibbles are weights 4i.. of sub-block 2g, high nibbles those of
sub-block 2g+1 (`quant_weight.PLANES`: the plane is the blocks' `qs` bytes, row-major).

x's quantization costs accuracy the float path does not lose (~0.4% of a dot
product's scale, the error llama.cpp's CUDA build has too); `qmatvec_q4k_dp4a` is
measured beside the float matvec (`benchmarks/quant_matvec.py`), not yet chosen by
`qlinear`. Under Triton's interpreter (the CPU tests) dp4a is emulated bytewise.
"""
from __future__ import annotations

import os

import torch

from engines.torch.kernels.quant_decode import _k_scales, triton
from engines.torch.kernels.quant_weight import QuantWeight

QK = 32                  # activations per int8 block (ggml's QK8_1)
SUPER = 256              # weights per Q4_K super-block
WORDS = SUPER // 8       # int32 words of quants per super-block (4 bits a weight)
LAUNCH = (1, 2, 2)       # rows per program, super-blocks per loop step, warps (untuned)

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _dp4a(a, b, c, EMULATE: tl.constexpr):
        """c + the dot product of the four bytes of a (each 0..15) and of b (signed int8)."""
        if EMULATE:
            acc = c
            for i in tl.static_range(4):
                acc += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
            return acc
        else:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _round_half_away(v):
        """roundf, as ggml's quantize_row_q8_1 rounds (not round-half-even)."""
        return tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))

    @triton.jit(do_not_specialize=["K"])
    def _quantize_x_kernel(x_ptr, q_ptr, d_ptr, s_ptr, K, BLOCKS: tl.constexpr):
        blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)               # [BLOCKS]
        k = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
        live = k < K
        x = tl.load(x_ptr + k, mask=live, other=0.0).to(tl.float32)
        d = tl.max(tl.abs(x), axis=1) / 127.0                               # [BLOCKS]
        inv = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
        q = _round_half_away(x * inv[:, None])
        tl.store(q_ptr + k, q.to(tl.int8), mask=live)
        whole = blk * 32 < K
        tl.store(d_ptr + blk, d, mask=whole)
        tl.store(s_ptr + blk, d * tl.sum(q, axis=1), mask=whole)

    @triton.jit(do_not_specialize=["N", "NB"])
    def _q4k_dp4a_kernel(out_ptr, qw_ptr, dm_ptr, sc_ptr, s_qw, s_dm, s_sc, xw_ptr, dx_ptr, sx_ptr,
                         N, NB, BN: tl.constexpr, SB: tl.constexpr, EMULATE: tl.constexpr):
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        r = tl.minimum(rows, N - 1)[:, None].to(tl.int64)                 # [BN, 1]
        w = tl.arange(0, SB * 32)[None, :]      # words of the step: super-block w//32, group (w%32)//8
        p = tl.arange(0, SB * 4)[None, :]       # (super-block, group) pairs of the step
        acc = tl.zeros([BN], dtype=tl.float32)
        for h0 in range(0, NB, SB):
            h = h0 + w // 32
            hc = tl.minimum(h, NB - 1)
            word_in_block = w % 32
            q = tl.load(qw_ptr + r * s_qw + hc * 32 + word_in_block)       # [BN, SB*32] int32
            # x's words for the low-nibble sub-block (2g) and the high one (2g + 1)
            x_lo = (hc * 8 + 2 * (word_in_block // 8)) * 8 + word_in_block % 8
            live = h < NB
            xa = tl.load(xw_ptr + x_lo, mask=live, other=0)
            xb = tl.load(xw_ptr + x_lo + 8, mask=live, other=0)
            dot_lo = _dp4a(q & 0x0F0F0F0F, xa, tl.zeros_like(q), EMULATE)
            dot_hi = _dp4a((q >> 4) & 0x0F0F0F0F, xb, tl.zeros_like(q), EMULATE)
            sum_lo = tl.sum(tl.reshape(dot_lo, (BN, SB * 4, 8)), axis=2).to(tl.float32)   # [BN, SB*4]
            sum_hi = tl.sum(tl.reshape(dot_hi, (BN, SB * 4, 8)), axis=2).to(tl.float32)
            hp = h0 + p // 4
            hpc = tl.minimum(hp, NB - 1)
            group = p % 4
            # d * scale and -dmin * min of each sub-block, as the float decoders read them
            scale_lo, offset_lo = _k_scales(dm_ptr + r * s_dm, sc_ptr + r * s_sc, hpc, 2 * group)
            scale_hi, offset_hi = _k_scales(dm_ptr + r * s_dm, sc_ptr + r * s_sc, hpc, 2 * group + 1)
            live_p = hp < NB
            sub_lo = hpc * 8 + 2 * group
            dx_lo = tl.load(dx_ptr + sub_lo, mask=live_p, other=0.0)
            dx_hi = tl.load(dx_ptr + sub_lo + 1, mask=live_p, other=0.0)
            sx_lo = tl.load(sx_ptr + sub_lo, mask=live_p, other=0.0)
            sx_hi = tl.load(sx_ptr + sub_lo + 1, mask=live_p, other=0.0)
            part = scale_lo * dx_lo * sum_lo + scale_hi * dx_hi * sum_hi + offset_lo * sx_lo + offset_hi * sx_hi
            acc += tl.sum(part, axis=1)
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=rows < N)


def emulated() -> bool:
    """Triton's interpreter (the CPU) runs no PTX: dp4a is computed bytewise there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [K] -> (int8 [K], float32 dx [K/32], float32 sx [K/32]), ggml's quantize_row_q8_1."""
    k = x.numel()
    blocks = triton.cdiv(k, QK)
    q = torch.empty(blocks * QK, dtype=torch.int8, device=x.device)
    dx = torch.empty(blocks, dtype=torch.float32, device=x.device)
    sx = torch.empty(blocks, dtype=torch.float32, device=x.device)
    per_program = 8
    _quantize_x_kernel[(triton.cdiv(blocks, per_program),)](x.reshape(-1), q, dx, sx, k, BLOCKS=per_program)
    return q, dx, sx


def supports(w: QuantWeight, rows_of_x: int) -> bool:
    return triton is not None and w.type_name == "Q4_K" and rows_of_x == 1 and w.shape[1] % SUPER == 0


def qmatvec_q4k_dp4a(x: torch.Tensor, w: QuantWeight, block_n: int | None = None,
                     super_blocks_per_step: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """x [1, K] (or [K]) -> [1, N] in x's dtype, W in Q4_K planes."""
    if not supports(w, x.reshape(-1, w.shape[1]).shape[0]):
        raise ValueError(f"dp4a matvec serves Q4_K at one row of x, K a multiple of {SUPER}")
    n, k = w.shape
    bn, sb, warps = block_n or LAUNCH[0], super_blocks_per_step or LAUNCH[1], num_warps or LAUNCH[2]
    xq, dx, sx = quantize_x(x.reshape(-1))
    words = w.planes["qs"].view(torch.int32)                                  # [N, NB*32]
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    _q4k_dp4a_kernel[(triton.cdiv(n, bn),)](
        out, words, w.planes["dm"], w.planes["scales"], words.stride(0), w.planes["dm"].stride(0),
        w.planes["scales"].stride(0), xq.view(torch.int32), dx, sx, n, k // SUPER,
        BN=bn, SB=sb, EMULATE=emulated(), num_warps=warps)
    return out.reshape(1, n)
