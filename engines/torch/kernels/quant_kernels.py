"""The Triton kernels over `QuantWeight` planes, and their launchers.

`qmatvec`: y[M, N] = x[M, K] @ W^T for decode (M <= 8; qlinear sends M <= 4).
Memory-bound in principle, instruction-bound in practice: on the H100 every type
decodes at 1.1-1.9e12 weights/s whatever its bytes, so Q8_0 reaches 0.9 of the
copy bandwidth and 4-bit types ~0.4 (benchmarks/results/quant_matvec.json). What
the sm_90 SASS of the loop showed, and what was done about it:
- I2F ran once a weight at a quarter of the FP32 rate: quants become floats
  through the exponent bits instead (`quant_decode._quants`, an OR and an FADD);
- the per-sub-block scales, loaded as [BN, T] tiles, took a different layout
  from the quants and a shared-memory round trip with barriers every step: they
  are [BN, T, 1] tiles of the quants' own layout now;
- a generic tile reads a byte once per nibble: at M=1 the nibble types run
  byte-pair decoders (`decode_pair`) that use both nibbles of one read;
- at M=1 the loop accumulates w * x elementwise (two FMAs a weight) and
  reduces once after it.
About 10 SASS instructions a weight remain for Q4_K (x's bf16 unpack, nibble
extraction, the FADD and two FMAs). A program owns a few rows and walks K in
steps of several chunks, all loads of a step in flight; K is split across
programs (float32 partials summed by one torch op) only where the rows alone
leave SMs idle.

The matvec body is `qmv_rows`, one program's rows: `_qmv_kernel` runs it for one weight,
`quant_group` for several weights of one x side by side. Its x may be a deferred norm
(NORM: normed_input.py) or a gated MLP's [gate | up] (GATE: gated_input.py).

`dequantize`: W -> [N, K] in a float dtype, one program per (BN rows, chunk),
for the prefill path of `quant_ops` and the tests. `qmatmul_fused`: the
dequantize-tile matmul that prefill measured against (quant_ops says why it is
not used).
"""
from __future__ import annotations

import functools

import torch

from engines.torch.kernels import pdl
from engines.torch.kernels.gated_input import gate_code, load_x
from engines.torch.kernels.normed_input import NormedInput, load_normed
from engines.torch.kernels.pdl import pdl_start, pdl_wait
from engines.torch.kernels.quant_decode import CHUNK, PAIR_TILES, TILES, decode_chunk, decode_pair, triton
from engines.torch.kernels.quant_weight import QuantWeight

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _row_pointers(p0, p1, p2, p3, s0, s1, s2, s3, rows):
        r3 = rows[:, None, None].to(tl.int64)
        r2 = rows[:, None].to(tl.int64)
        return (p0 + r3 * s0, p1 + r3 * s1, p2 + r3 * s2, p3 + r3 * s3,
                p0 + r2 * s0, p1 + r2 * s1, p2 + r2 * s2, p3 + r2 * s3)

    @triton.jit
    def _rstd(sum_of_squares, K, eps):
        """1 / sqrt(mean(s^2) + eps), as fused_small's RMSNorm computes it."""
        return 1.0 / tl.sqrt(sum_of_squares / K + eps)

    @triton.jit
    def _chunk_tiles(first, nchunks, S: tl.constexpr, L: tl.constexpr, T: tl.constexpr):
        """Sub-block tiles of chunks first .. first + T/S - 1: chunk (clamped to the last one, so
        loads stay in bounds; x is masked there) and place within the chunk, 3-D and 2-D."""
        t3 = tl.arange(0, T)[None, :, None]
        t2 = tl.arange(0, T)[None, :]
        h3 = tl.minimum(first + t3 // S, nchunks - 1)
        h2 = tl.minimum(first + t2 // S, nchunks - 1)
        return h3, h2, t3 % S, t2 % S, t3

    # sizes vary per weight and per call: one compiled kernel serves them (strides stay
    # specialized: their divisibility by 16 lets the loads vectorize)
    @triton.jit(do_not_specialize=["M", "N", "K", "stride_os", "stride_om", "chunks_per_split", "x_div"])
    def _qmv_kernel(x_ptr, out_ptr, bias_ptr, p0, p1, p2, p3, s0, s1, s2, s3,
                    M, N, K, stride_xm, stride_os, stride_om, chunks_per_split,
                    TYPE: tl.constexpr, S: tl.constexpr, L: tl.constexpr, CPI: tl.constexpr,
                    BN: tl.constexpr, BM: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PAIRED: tl.constexpr, S2: tl.constexpr, L2: tl.constexpr,
                    ids_ptr=None, x_div=1, INDEXED: tl.constexpr = False, GATE: tl.constexpr = 0,
                    USE_PDL: tl.constexpr = False, d_ptr=None, g_ptr=None, sum_ptr=None, eps=0.0,
                    NORM: tl.constexpr = False, HAS_DELTA: tl.constexpr = False):
        # USE_PDL (pdl.py): weights and bias before pdl_wait, x after it; never with INDEXED
        # (the expert ids come from the kernel before).
        pdl_start(USE_PDL)
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        if INDEXED:
            # Stacked experts (quant_experts.py): program axis 2 is a (token, expert) pair; its
            # expert's N rows start at expert * N, its x row is pair // x_div, its output row pair.
            pair = tl.program_id(2)
            first_row = tl.load(ids_ptr + pair).to(tl.int64) * N
            p0 += first_row * s0
            p1 += first_row * s1
            p2 += first_row * s2
            p3 += first_row * s3
            x_ptr += (pair // x_div).to(tl.int64) * stride_xm
            out_ptr += pair.to(tl.int64) * stride_om
        qmv_rows(x_ptr, out_ptr, bias_ptr, p0, p1, p2, p3, s0, s1, s2, s3, M, N, K, stride_xm, stride_os,
                 stride_om, chunks_per_split, pid_n, pid_k, pid_n == 0, d_ptr, g_ptr, sum_ptr, eps,
                 TYPE, S, L, CPI, BN, BM, HAS_BIAS, PAIRED, S2, L2, GATE, USE_PDL, NORM, HAS_DELTA)

    @triton.jit
    def qmv_rows(x_ptr, out_ptr, bias_ptr, p0, p1, p2, p3, s0, s1, s2, s3, M, N, K, stride_xm, stride_os,
                 stride_om, chunks_per_split, pid_n, pid_k, write_sum, d_ptr, g_ptr, sum_ptr, eps,
                 TYPE: tl.constexpr, S: tl.constexpr, L: tl.constexpr, CPI: tl.constexpr,
                 BN: tl.constexpr, BM: tl.constexpr, HAS_BIAS: tl.constexpr, PAIRED: tl.constexpr,
                 S2: tl.constexpr, L2: tl.constexpr, GATE: tl.constexpr, USE_PDL: tl.constexpr,
                 NORM: tl.constexpr, HAS_DELTA: tl.constexpr):
        """Program (pid_n, pid_k) of a matvec: its BN rows of W over its split of K, stored.
        NORM (normed_input.py): x is rms_norm(x + d) * g, read here; sum(s^2) rides along in
        `sq`, rstd scales the sums after the loop. Only with one split (the whole K here);
        the residual sum is stored where write_sum."""
        rows = pid_n * BN + tl.arange(0, BN)
        # clamp, not mask: the tail's loads stay unconditional and vectorized; its stores are masked
        b0, b1, b2, b3, c0, c1, c2, c3 = _row_pointers(p0, p1, p2, p3, s0, s1, s2, s3, tl.minimum(rows, N - 1))
        j3 = tl.arange(0, L)[None, None, :]
        mids = tl.arange(0, BM)[None, None, :]
        nchunks = tl.cdiv(K, S * L)
        first = pid_k * chunks_per_split
        last = tl.minimum(first + chunks_per_split, nchunks)
        # Per-sub-block values are [BN, T, 1] tiles of the quants' own layout (scales read
        # through the 3-D row pointers): no layout conversion, no barrier inside the loop.
        if PAIRED:
            # one row of x, nibble types: each byte read once, both nibbles used (decode_pair)
            j2 = tl.arange(0, L2)[None, None, :]
            acc2 = tl.zeros([BN, CPI * S2, L2], dtype=tl.float32)
            sq2 = tl.zeros([1, CPI * S2, L2], dtype=tl.float32)
            for c in range(first, last, CPI):
                h3, h2, z3, z2, t3 = _chunk_tiles(c, nchunks, S2, L2, CPI * S2)
                start = (c + t3 // S2) * (S * L)         # [1, T2, 1] each tile row's chunk, unclamped
                m3 = ((start + z3 * 32) < K) & ((c + t3 // S2) < last)
                qa, sa, oa, xa, qb, sb, ob, xb = decode_pair(TYPE, b0, b1, b2, b3, h3, z3, j2, m3)
                pdl_wait(USE_PDL)
                if NORM:
                    s_a, x_a = load_normed(x_ptr, d_ptr, g_ptr, sum_ptr, start + xa, start + xa, m3, write_sum,
                                           HAS_DELTA)
                    s_b, x_b = load_normed(x_ptr, d_ptr, g_ptr, sum_ptr, start + xb, start + xb, m3, write_sum,
                                           HAS_DELTA)
                    sq2 += s_a * s_a + s_b * s_b
                else:
                    x_a = load_x(x_ptr, start + xa, m3, K, GATE)
                    x_b = load_x(x_ptr, start + xb, m3, K, GATE)
                acc2 += (qa * sa + oa) * x_a
                acc2 += (qb * sb + ob) * x_b
            total = tl.sum(tl.sum(acc2, axis=2), axis=1)[:, None]      # [BN, 1]
            if NORM:
                total *= _rstd(tl.sum(tl.sum(sq2, axis=2), axis=1)[:, None], K, eps)
        elif BM == 1:
            # one row of x: accumulate w * x elementwise (two FMAs a weight), reduce once at the end
            acc1 = tl.zeros([BN, CPI * S, L], dtype=tl.float32)
            sq1 = tl.zeros([1, CPI * S, L], dtype=tl.float32)
            for c in range(first, last, CPI):
                h3, h2, z3, z2, t3 = _chunk_tiles(c, nchunks, S, L, CPI * S)
                kx = c * S * L + t3 * L                  # [1, T, 1] first weight of each sub-block
                m3 = (kx < K) & ((c + t3 // S) < last)   # past the split's last chunk: x reads 0
                q, scale, offset = decode_chunk(TYPE, b0, b1, b2, b3, b0, b1, b2, b3, h3, h3, z3, j3, z3, m3, m3)
                pdl_wait(USE_PDL)
                if NORM:
                    sv, xv = load_normed(x_ptr, d_ptr, g_ptr, sum_ptr, kx + j3, kx + j3, m3, write_sum, HAS_DELTA)
                    sq1 += sv * sv
                else:
                    xv = load_x(x_ptr, kx + j3, m3, K, GATE)
                acc1 += (q * scale + offset) * xv
            total = tl.sum(tl.sum(acc1, axis=2), axis=1)[:, None]      # [BN, 1]
            if NORM:
                total *= _rstd(tl.sum(tl.sum(sq1, axis=2), axis=1)[:, None], K, eps)
        else:
            # [BN, T, BM] partial sums per sub-block: q*x summed per sub-block, then scaled once
            acc = tl.zeros([BN, CPI * S, BM], dtype=tl.float32)
            sqm = tl.zeros([1, 1, BM], dtype=tl.float32)
            for c in range(first, last, CPI):
                h3, h2, z3, z2, t3 = _chunk_tiles(c, nchunks, S, L, CPI * S)
                kx = c * S * L + t3 * L
                m3 = (kx < K) & ((c + t3 // S) < last)
                q, scale, offset = decode_chunk(TYPE, b0, b1, b2, b3, b0, b1, b2, b3, h3, h3, z3, j3, z3, m3, m3)
                pdl_wait(USE_PDL)
                for m in tl.static_range(BM):
                    mm = m3 & ((j3 * 0 + m) < M)
                    if NORM:
                        sv, xv = load_normed(x_ptr, d_ptr, g_ptr, sum_ptr, m * stride_xm + kx + j3, kx + j3, mm,
                                             write_sum, HAS_DELTA)
                        sqm = tl.where(mids == m, sqm + tl.sum(tl.sum(sv * sv, axis=2), axis=1)[:, None, None], sqm)
                    else:
                        xv = load_x(x_ptr, m * stride_xm + kx + j3, mm, K, GATE)
                    part = scale * tl.sum(q * xv, axis=2, keep_dims=True) + offset * tl.sum(xv, axis=2, keep_dims=True)
                    acc = tl.where(mids == m, acc + part, acc)
            total = tl.sum(acc, axis=1)                  # [BN, BM]
            if NORM:
                total *= _rstd(tl.sum(sqm, axis=1), K, eps)
        pdl_wait(USE_PDL)     # a split with no chunk of K (no loop step) still stores after it
        mids2 = tl.arange(0, BM)[None, :]
        if HAS_BIAS:
            total += tl.load(bias_ptr + tl.minimum(rows, N - 1)).to(tl.float32)[:, None]
        out = out_ptr + pid_k * stride_os + mids2 * stride_om + rows[:, None]
        tl.store(out, total.to(out_ptr.dtype.element_ty), mask=(mids2 < M) & (rows[:, None] < N))

    @triton.jit(do_not_specialize=["N", "K"])
    def _dequant_kernel(out_ptr, p0, p1, p2, p3, s0, s1, s2, s3, N, K, stride_on,
                        TYPE: tl.constexpr, S: tl.constexpr, L: tl.constexpr, BN: tl.constexpr,
                        ids_ptr=None, INDEXED: tl.constexpr = False):
        # INDEXED: output row i is weight row ids[i] (an embedding lookup: N is the ids' count)
        pid_n, c = tl.program_id(0), tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        src = tl.minimum(rows, N - 1)
        if INDEXED:
            src = tl.load(ids_ptr + src)
        b0, b1, b2, b3, c0, c1, c2, c3 = _row_pointers(p0, p1, p2, p3, s0, s1, s2, s3, src)
        z3 = tl.arange(0, S)[None, :, None]
        j3 = tl.arange(0, L)[None, None, :]
        z2 = tl.arange(0, S)[None, :]
        k0 = c * S * L
        m3 = (k0 + z3 * L) < K
        q, scale, offset = decode_chunk(TYPE, b0, b1, b2, b3, c0, c1, c2, c3, c, c, z3, j3, z2,
                                        m3, (k0 + z2 * L) < K)
        w = q * scale[:, :, None] + offset[:, :, None]
        out = out_ptr + rows[:, None, None].to(tl.int64) * stride_on + k0 + z3 * L + j3
        tl.store(out, w.to(out_ptr.dtype.element_ty), mask=(rows[:, None, None] < N) & m3)


MAX_DECODE_ROWS = 8     # qmatvec serves M up to this at most
# M above which dequantize + cuBLAS beats qmatvec (H100, 8B shapes, benchmarks/quant_matvec.py):
# qmatvec's cost grows with M (x converted and multiplied per row: ALU-bound past M=4),
# the dequantize pass does not. Q4_K 14336x4096 at M=4: 72 us against 104; at M=8: 119
# against 104. Q8_0 decodes cheapest and stays ahead at M=8 (100 against 116).
MATVEC_MAX_ROWS: dict[str, int] = {"Q8_0": 8}
DEFAULT_MATVEC_MAX_ROWS = 4
# Launch shape of qmatvec: type -> (rows per program, chunks per loop step, warps). A program
# reads a few rows by a long stretch of K per step, all loads issued at once, as llama.cpp's
# mmvq: many programs sit on each SM with their loads in flight. Swept on the 8B layer shapes
# (H100, benchmarks/results/quant_matvec.json "sweep", one layer's matvecs at M=1):
# Q4_K 118 us at (1, 8, 2) against 146 at (1, 8, 4); Q6_K 155 against 175; Q4_0 96 against
# 114; Q8_0 best at (1, 8, 4), 109 against 219 at 2 warps. Q5_K and Q4_1/Q5_0/Q5_1 run the
# same byte-pair decoders as Q4_K/Q4_0 and take their shape; Q2_K/Q3_K the default.
PAIR_LAUNCH = (1, 8, 2)
LAUNCH: dict[str, tuple[int, int, int]] = {
    name: PAIR_LAUNCH for name in ("Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1")}
DEFAULT_LAUNCH = (1, 8, 4)
# Rows of at most SHORT_K_CHUNKS chunks (1,024 weights: SmolLM2's 576, Qwen2.5-0.5B's 896) at
# one row of x: eight chunks a step left most of each tile masked. Four a step, four warps a
# program where the weight has few rows and one where it has many (programs enough to fill
# the SMs), from benchmarks/results/quant_small.json (H100, SmolLM2's Q4_K_M shapes): Q5_0
# 3072x576 3.9 us against 5.7, 576x576 2.6 against 2.9, the rest within 3%.
SHORT_K_CHUNKS = 4
SHORT_K_FEW_ROWS = 1024
PROGRAMS_PER_SM = 2     # below this many row programs per SM, split K across programs


def launch_for(type_name: str, n: int, k: int, rows_of_x: int) -> tuple[int, int, int]:
    """(rows a program, chunks a step, warps) for this weight's shape and rows of x."""
    if rows_of_x == 1 and triton.cdiv(k, CHUNK) <= SHORT_K_CHUNKS:
        return 1, SHORT_K_CHUNKS, 4 if n <= SHORT_K_FEW_ROWS else 1
    return LAUNCH.get(type_name, DEFAULT_LAUNCH)


def matvec_max_rows(type_name: str) -> int:
    """Rows of x up to which qlinear takes qmatvec for this type."""
    return MATVEC_MAX_ROWS.get(type_name, DEFAULT_MATVEC_MAX_ROWS)


def kernel_ready(w: QuantWeight) -> bool:
    """Whether the Triton kernels read this weight (block types whose rows are whole chunks,
    or legacy blocks: their ragged tail is masked)."""
    if triton is None or w.type_name not in TILES:
        return False
    return w.type_name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1") or w.shape[1] % CHUNK == 0


def plane_args(w: QuantWeight) -> tuple[list[torch.Tensor], list[int]]:
    planes = w.plane_list()
    planes += [planes[0]] * (4 - len(planes))
    return planes, [p.stride(0) for p in planes]


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int | None) -> int:
    if device_index is None:  # interpreter on the CPU
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_for(n: int, k: int, device: torch.device, block_n: int, chunks_per_step: int) -> int:
    """How many programs share a row's K: 1 unless the row programs alone leave SMs idle."""
    steps = triton.cdiv(triton.cdiv(k, CHUNK), chunks_per_step)
    row_programs = triton.cdiv(n, block_n)
    want = PROGRAMS_PER_SM * _sm_count(device.index if device.type == "cuda" else None)
    split = max(1, min(steps, triton.cdiv(want, row_programs)))
    return triton.cdiv(steps, triton.cdiv(steps, split))


def kernel_meta(type_name: str, block_n: int, chunks_per_step: int, num_warps: int, rows_of_x: int,
                paired: bool = True) -> dict:
    """_qmv_kernel's compile-time arguments for this type, launch and rows of x."""
    type_id, s, l = TILES[type_name]
    bm = triton.next_power_of_2(rows_of_x)
    s2, l2 = PAIR_TILES.get(type_name, (1, 1))
    return dict(TYPE=type_id, S=s, L=l, CPI=chunks_per_step, BN=block_n, BM=bm, num_warps=num_warps,
                PAIRED=bm == 1 and paired and type_name in PAIR_TILES, S2=s2, L2=l2)


def qmatvec(x: torch.Tensor | NormedInput, w: QuantWeight, bias: torch.Tensor | None = None,
            block_n: int | None = None, split: int | None = None, chunks_per_step: int | None = None,
            num_warps: int | None = None, paired: bool = True, gated: str | None = None) -> torch.Tensor:
    """x [M, K] (M <= 8) -> [M, N] in x's dtype. Launch arguments left None come from launch_for.
    gated ("silu", "gelu_tanh"): x is a gated MLP's [M, 2K] = [gate | up], and the kernel reads
    act(gate) * up (gated_input.py). x a NormedInput ([..., K], M rows): the kernel reads
    rms_norm(x + delta) and writes the sum (normed_input.py); K is never split then."""
    normed = x if isinstance(x, NormedInput) else None
    x = x.x.view(normed.rows(), -1) if normed is not None else x
    m, width = x.shape
    k, n = w.shape[1], w.shape[0]
    launch = launch_for(w.type_name, n, k, m)
    block_n = block_n or launch[0]
    chunks_per_step = chunks_per_step or launch[1]
    num_warps = num_warps or launch[2]
    assert m <= MAX_DECODE_ROWS and width == (2 * k if gated else k), "qmatvec: M <= 8 rows of in_features"
    assert not (gated and normed), "qmatvec: a gated x is never a normed one"
    x = x.contiguous()
    planes, strides = plane_args(w)
    split = 1 if normed is not None else split or split_for(n, k, x.device, block_n, chunks_per_step)
    steps = triton.cdiv(triton.cdiv(k, CHUNK), chunks_per_step)
    chunks_per_split = triton.cdiv(steps, split) * chunks_per_step
    split = triton.cdiv(triton.cdiv(k, CHUNK), chunks_per_split)
    meta = kernel_meta(w.type_name, block_n, chunks_per_step, num_warps, m, paired)
    meta["GATE"] = gate_code(gated)
    meta.update(pdl.options(x.device))
    if normed is not None:
        meta.update(normed.kernel_args())
        meta["d_ptr"] = meta.pop("delta")
    grid = (triton.cdiv(n, block_n), split)
    if split == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        _qmv_kernel[grid](x, out, bias if bias is not None else out, *planes, *strides, m, n, k,
                          x.stride(0), 0, n, chunks_per_split, HAS_BIAS=bias is not None, **meta)
        return out
    partial = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _qmv_kernel[grid](x, partial, partial, *planes, *strides, m, n, k, x.stride(0), m * n, n,
                      chunks_per_split, HAS_BIAS=False, **meta)
    out = partial.sum(0)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def dequantize(w: QuantWeight, dtype: torch.dtype, block_n: int = 16, ids: torch.Tensor | None = None) -> torch.Tensor:
    """W -> [N, K] in `dtype`, decoded on W's device by the Triton kernel; with `ids` (int64 [n],
    on W's device), only those rows -> [n, K] in one launch (an embedding lookup)."""
    n, k = w.shape
    type_id, s, l = TILES[w.type_name]
    planes, strides = plane_args(w)
    rows = n if ids is None else ids.numel()
    out = torch.empty((rows, k), dtype=dtype, device=w.device)
    indexed = {} if ids is None else {"ids_ptr": ids, "INDEXED": True}
    _dequant_kernel[(triton.cdiv(rows, block_n), triton.cdiv(k, CHUNK))](
        out, *planes, *strides, rows, k, k, TYPE=type_id, S=s, L=l, BN=block_n, num_warps=4, **indexed)
    return out


if triton is not None:
    @triton.jit(do_not_specialize=["M", "N", "K"])
    def _qmm_kernel(x_ptr, out_ptr, p0, p1, p2, p3, s0, s1, s2, s3, M, N, K, stride_xm, stride_om,
                    TYPE: tl.constexpr, S: tl.constexpr, L: tl.constexpr,
                    BLOCK_M: tl.constexpr, BN: tl.constexpr):
        """Prefill alternative: dequantize a [BN, 256] weight tile in registers, tensor-core dot."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = pid_n * BN + tl.arange(0, BN)
        b0, b1, b2, b3, c0, c1, c2, c3 = _row_pointers(p0, p1, p2, p3, s0, s1, s2, s3, tl.minimum(rows, N - 1))
        z3 = tl.arange(0, S)[None, :, None]
        j3 = tl.arange(0, L)[None, None, :]
        z2 = tl.arange(0, S)[None, :]
        tok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
        kk = tl.arange(0, S * L)[None, :]
        acc = tl.zeros([BLOCK_M, BN], dtype=tl.float32)
        for c in range(0, tl.cdiv(K, S * L)):
            k0 = c * S * L
            m3 = (k0 + z3 * L) < K
            q, scale, offset = decode_chunk(TYPE, b0, b1, b2, b3, c0, c1, c2, c3, c, c, z3, j3, z2,
                                            m3, (k0 + z2 * L) < K)
            w = tl.reshape(q * scale[:, :, None] + offset[:, :, None], [BN, S * L])
            xt = tl.load(x_ptr + tok.to(tl.int64) * stride_xm + k0 + kk, mask=(tok < M) & (k0 + kk < K), other=0.0)
            acc = tl.dot(xt, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
        out = out_ptr + tok.to(tl.int64) * stride_om + rows[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(tok < M) & (rows[None, :] < N))


def qmatmul_fused(x: torch.Tensor, w: QuantWeight, block_m: int = 64, block_n: int = 64,
                  num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """x [M, K] (fp16/bf16) -> [M, N]: the dequantize-tile matmul (see quant_ops for why it is not the default)."""
    m, k = x.shape
    n = w.shape[0]
    x = x.contiguous()
    type_id, s, l = TILES[w.type_name]
    planes, strides = plane_args(w)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _qmm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, out, *planes, *strides, m, n, k, x.stride(0), n, TYPE=type_id, S=s, L=l,
        BLOCK_M=block_m, BN=block_n, num_warps=num_warps, num_stages=num_stages)
    return out
