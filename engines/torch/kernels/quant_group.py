"""One launch for the projections that read one x but differ in type: q, k and v.

A GGUF file may give a layer's q, k and v different types: llama.cpp's Q4_K_M
recipe writes attn_v one step up in some layers (SmolLM2-135M: q, k Q5_0 and v
Q8_0 in 13 of its 30 layers), so the loader cannot concatenate them into one
weight (engines.torch.load.gguf_quant fuses parts of one type only) and a decode
step launched three matvecs there. SmolLM2's step is bound by its number of
launches, not its bytes (normed_input.py says how many), so here one grid holds the
row programs of every part: program p runs part A's matvec for p < programs(A),
then B's, then C's, each with its own type's decoder (a branch on constexpr types:
the kernel holds each part's loop), writing its columns of one [M, N_A + N_B + N_C]
output. x may be a deferred norm (NormedInput): each part reads it as the lone
matvec does, and program 0 writes the residual sum.

Taken where every part would run the float matvec (`quant_kernels.qmatvec`) with the
same launch (rows a program, chunks a step, warps) and K unsplit: `grouped` says.
"""
from __future__ import annotations

import torch

from engines.torch.kernels import pdl, quant_dp4a, quant_kernels
from engines.torch.kernels.normed_input import NormedInput
from engines.torch.kernels.pdl import pdl_start
from engines.torch.kernels.quant_decode import CHUNK, triton
from engines.torch.kernels.quant_kernels import kernel_meta, launch_for, plane_args, qmv_rows
from engines.torch.kernels.quant_weight import FLOAT_TYPES, QuantWeight

MAX_PARTS = 3

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _part(x_ptr, out_ptr, bias_ptr, p0, p1, p2, p3, s0, s1, s2, s3, M, N, K, stride_xm, stride_om,
              chunks, pid, write_sum, d_ptr, g_ptr, sum_ptr, eps,
              TYPE: tl.constexpr, S: tl.constexpr, L: tl.constexpr, CPI: tl.constexpr, BN: tl.constexpr,
              BM: tl.constexpr, HAS_BIAS: tl.constexpr, PAIRED: tl.constexpr, S2: tl.constexpr, L2: tl.constexpr,
              USE_PDL: tl.constexpr, NORM: tl.constexpr, HAS_DELTA: tl.constexpr):
        qmv_rows(x_ptr, out_ptr, bias_ptr, p0, p1, p2, p3, s0, s1, s2, s3, M, N, K, stride_xm, 0, stride_om,
                 chunks, pid, 0, write_sum, d_ptr, g_ptr, sum_ptr, eps, TYPE, S, L, CPI, BN, BM, HAS_BIAS,
                 PAIRED, S2, L2, 0, USE_PDL, NORM, HAS_DELTA)

    @triton.jit(do_not_specialize=["M", "K", "chunks", "NA", "NB", "NC", "stride_om"])
    def _qmv_group_kernel(x_ptr, out_ptr, M, K, stride_xm, stride_om, chunks,
                          a0, a1, a2, a3, as0, as1, as2, as3, NA, bias_a,
                          b0, b1, b2, b3, bs0, bs1, bs2, bs3, NB, bias_b,
                          c0, c1, c2, c3, cs0, cs1, cs2, cs3, NC, bias_c,
                          d_ptr, g_ptr, sum_ptr, eps,
                          TA: tl.constexpr, SA: tl.constexpr, LA: tl.constexpr, PA: tl.constexpr,
                          SA2: tl.constexpr, LA2: tl.constexpr, BIAS_A: tl.constexpr,
                          TB: tl.constexpr, SB: tl.constexpr, LB: tl.constexpr, PB: tl.constexpr,
                          SB2: tl.constexpr, LB2: tl.constexpr, BIAS_B: tl.constexpr,
                          TC: tl.constexpr, SC: tl.constexpr, LC: tl.constexpr, PC: tl.constexpr,
                          SC2: tl.constexpr, LC2: tl.constexpr, BIAS_C: tl.constexpr,
                          CPI: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                          USE_PDL: tl.constexpr, NORM: tl.constexpr, HAS_DELTA: tl.constexpr):
        pdl_start(USE_PDL)
        # A part of two-part groups repeats B's arguments: its branch compiles but no program takes it.
        pid = tl.program_id(0)
        programs_a = tl.cdiv(NA, BN)
        programs_b = tl.cdiv(NB, BN)
        if pid < programs_a:
            _part(x_ptr, out_ptr, bias_a, a0, a1, a2, a3, as0, as1, as2, as3, M, NA, K, stride_xm, stride_om,
                  chunks, pid, pid == 0, d_ptr, g_ptr, sum_ptr, eps, TA, SA, LA, CPI, BN, BM, BIAS_A, PA, SA2, LA2,
                  USE_PDL, NORM, HAS_DELTA)
        elif pid < programs_a + programs_b:
            _part(x_ptr, out_ptr + NA, bias_b, b0, b1, b2, b3, bs0, bs1, bs2, bs3, M, NB, K, stride_xm, stride_om,
                  chunks, pid - programs_a, False, d_ptr, g_ptr, sum_ptr, eps, TB, SB, LB, CPI, BN, BM, BIAS_B,
                  PB, SB2, LB2, USE_PDL, NORM, HAS_DELTA)
        else:
            _part(x_ptr, out_ptr + NA + NB, bias_c, c0, c1, c2, c3, cs0, cs1, cs2, cs3, M, NC, K, stride_xm,
                  stride_om, chunks, pid - programs_a - programs_b, False, d_ptr, g_ptr, sum_ptr, eps,
                  TC, SC, LC, CPI, BN, BM, BIAS_C, PC, SC2, LC2, USE_PDL, NORM, HAS_DELTA)


def grouped(weights: list[QuantWeight], rows_of_x: int) -> bool:
    """Whether these weights (2 or 3, one x) run as one launch: each on the float matvec
    (no dp4a, a block type with its kernel, rows of x within its matvec range), one launch
    shape for all, one K, and K not split across programs."""
    if triton is None or not 2 <= len(weights) <= MAX_PARTS:
        return False
    if len({w.shape[1] for w in weights}) != 1 or len({w.device for w in weights}) != 1:
        return False
    if any(w.type_name in FLOAT_TYPES or not quant_kernels.kernel_ready(w) or quant_dp4a.chosen(w, rows_of_x)
           or rows_of_x > quant_kernels.matvec_max_rows(w.type_name) for w in weights):
        return False
    k = weights[0].shape[1]
    launches = {launch_for(w.type_name, w.shape[0], k, rows_of_x) for w in weights}
    if len(launches) != 1:
        return False
    block_n, chunks_per_step, _ = launches.pop()
    return all(quant_kernels.split_for(w.shape[0], k, w.device, block_n, chunks_per_step) == 1 for w in weights)


def _part_args(w: QuantWeight, bias: torch.Tensor | None, out: torch.Tensor, meta: dict,
               letter: str) -> tuple[list, dict]:
    """Part `letter`'s pointers and sizes, and its constexprs as the kernel names them (TA, SA2...)."""
    planes, strides = plane_args(w)
    return [*planes, *strides, w.shape[0], bias if bias is not None else out], {
        f"T{letter}": meta["TYPE"], f"S{letter}": meta["S"], f"L{letter}": meta["L"], f"P{letter}": meta["PAIRED"],
        f"S{letter}2": meta["S2"], f"L{letter}2": meta["L2"], f"BIAS_{letter}": bias is not None}


def qmatvec_group(x: torch.Tensor | NormedInput, weights: list[QuantWeight],
                  biases: list[torch.Tensor | None]) -> torch.Tensor:
    """x [..., K] (or a NormedInput) of M rows -> [M, sum of N] in x's dtype: each weight's
    matvec side by side, in one launch (`grouped` must hold)."""
    normed = x if isinstance(x, NormedInput) else None
    x2 = (normed.x if normed is not None else x).reshape(-1, weights[0].shape[1]).contiguous()
    m, k = x2.shape
    block_n, chunks_per_step, num_warps = launch_for(weights[0].type_name, weights[0].shape[0], k, m)
    total = sum(w.shape[0] for w in weights)
    out = torch.empty((m, total), dtype=x2.dtype, device=x2.device)
    args, consts = [], {}
    parts = list(zip(weights, biases)) + [(weights[-1], biases[-1])] * (MAX_PARTS - len(weights))   # see the kernel
    for (w, bias), letter in zip(parts, "ABC"):
        meta = kernel_meta(w.type_name, block_n, chunks_per_step, num_warps, m)
        part_args, part_consts = _part_args(w, bias, out, meta, letter)
        args += part_args
        consts.update(part_consts)
    chunks = triton.cdiv(triton.cdiv(k, CHUNK), chunks_per_step) * chunks_per_step
    norm = normed.kernel_args() if normed is not None else {}
    norm_ptrs = [norm.pop(name, x2) for name in ("delta", "g_ptr", "sum_ptr")] + [norm.pop("eps", 0.0)]
    programs = sum(triton.cdiv(w.shape[0], block_n) for w in weights)
    _qmv_group_kernel[(programs,)](
        x2, out, m, k, x2.stride(0), out.stride(0), chunks, *args, *norm_ptrs, **consts,
        CPI=chunks_per_step, BN=block_n, BM=triton.next_power_of_2(m),
        num_warps=num_warps, NORM=norm.get("NORM", False), HAS_DELTA=norm.get("HAS_DELTA", False),
        **pdl.options(x2.device))
    return out
