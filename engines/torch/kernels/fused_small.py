"""One launch for what eager torch runs as many: RMSNorm (with the residual add before
it; or two of them, the per-head q and k norms), and the gated MLP's activation.

Why: an eager decode step (the batch-1 graph a cold model serves before anything
compiles, and the one a compiled 8B model may keep at batch 1: serve/batch_one.py)
is mostly small kernels. RMSNorm in float32 as `norms.RMSNorm` writes it is nine
launches (cast, square, mean, add, rsqrt, multiply, the weight's cast, multiply,
cast back), twice a layer, and the residual add before the MLP's norm one more; the
gated activation is two (activation, multiply).
Inside a CUDA graph each small launch still costs ~2 us on the H100, so an 8B
Q4_K_M step spent about half of its 4.09 ms in them (the weights' matvecs read
4.9 GB in ~1.8 ms). Here each is one program a row, float32 inside, one rounding
at the end.

Only where nothing fuses them already: on CUDA, outside torch.compile (Inductor
fuses the torch ops with their neighbours, residual adds included, better than a
custom kernel could be fused). `usable` says where.
"""
from __future__ import annotations

import torch

from engines.torch.kernels import pdl
from engines.torch.kernels.gated_input import activate, gate_code
from engines.torch.kernels.pdl import pdl_start, pdl_wait
from engines.torch.kernels.quant_decode import tl, triton

MAX_COLS = 16384      # one program holds a whole row in registers up to this


def usable(x: torch.Tensor) -> bool:
    """Eager on the GPU, a row that fits. (The CPU keeps the torch ops: its tests run these
    kernels by name through Triton's interpreter, tests/engines/test_fused_small.py.)"""
    return (triton is not None and x.is_cuda and not torch.compiler.is_compiling()
            and x.shape[-1] <= MAX_COLS)


if triton is not None:
    @triton.jit
    def _store_normed(x, w_ptr, out_at, cols, mask, n_cols, eps):
        """x (float32, one row) * rsqrt(mean(x^2) + eps) * w, stored at out_at in its dtype."""
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_at + cols, (x * inv * w).to(out_at.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, x_row_stride, out_row_stride, eps,
                         BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_start(USE_PDL)
        pdl_wait(USE_PDL)     # pdl.py: every input here is the kernel before's
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        _store_normed(x, w_ptr, out_ptr + row * out_row_stride, cols, mask, n_cols, eps)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, n_cols, x_row_stride, d_row_stride,
                             sum_row_stride, out_row_stride, eps, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_start(USE_PDL)
        pdl_wait(USE_PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + row * d_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # The sum rounded to the residual's dtype first, as torch's add is: the norm reads
        # the very residual the next add continues from.
        s = (x + d).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * sum_row_stride + cols, s, mask=mask)
        _store_normed(s.to(tl.float32), w_ptr, out_ptr + row * out_row_stride, cols, mask, n_cols, eps)

    @triton.jit
    def _rms_norm_pair_kernel(a_ptr, b_ptr, wa_ptr, wb_ptr, oa_ptr, ob_ptr, a_rows, n_cols,
                              a_row_stride, b_row_stride, eps, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_start(USE_PDL)
        pdl_wait(USE_PDL)
        # Rows 0 .. a_rows - 1 are a's (with wa), the rest b's (with wb): q's heads, then k's.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        if row < a_rows:
            x_at = a_ptr + row * a_row_stride
            w_at = wa_ptr
            o_at = oa_ptr + row * n_cols
        else:
            x_at = b_ptr + (row - a_rows) * b_row_stride
            w_at = wb_ptr
            o_at = ob_ptr + (row - a_rows) * n_cols
        x = tl.load(x_at + cols, mask=mask, other=0.0).to(tl.float32)
        _store_normed(x, w_at, o_at, cols, mask, n_cols, eps)

    @triton.jit
    def _gated_kernel(h_ptr, out_ptr, n_cols, h_row_stride, out_row_stride,
                      GATE: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_start(USE_PDL)
        pdl_wait(USE_PDL)
        # h's row is [gate | up], each n_cols wide (the fused gate_up projection's output).
        row, part = tl.program_id(0), tl.program_id(1)
        cols = part * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(h_ptr + row * h_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * h_row_stride + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        act_up = activate(gate, up, GATE)
        tl.store(out_ptr + row * out_row_stride + cols, act_up.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, cols] with a contiguous last dim (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, in float32, returned in x's dtype."""
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    n_cols = rows.shape[1]
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, n_cols, rows.stride(0), out.stride(0),
                                       float(eps), BLOCK=block, num_warps=min(16, max(1, block // 256)),
                                       **pdl.options(x.device))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 total: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) in one launch: the residual stream and its norm.
    `total`: a contiguous tensor of x's shape and dtype to write the sum into."""
    rows, drows = _rows(x), _rows(delta)
    if drows.shape != rows.shape:
        raise ValueError(f"add_rms_norm: the residual {tuple(x.shape)} and the addend "
                         f"{tuple(delta.shape)} differ")
    if total is None:
        total = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    else:
        total = total.view(rows.shape)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    n_cols = rows.shape[1]
    block = triton.next_power_of_2(n_cols)
    _add_rms_norm_kernel[(rows.shape[0],)](rows, drows, weight.contiguous(), total, out, n_cols, rows.stride(0),
                                           drows.stride(0), total.stride(0), out.stride(0), float(eps),
                                           BLOCK=block, num_warps=min(16, max(1, block // 256)),
                                           **pdl.options(x.device))
    return total.view(x.shape), out.view(x.shape)


def rms_norm_pair(a: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, wb: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(a, wa), rms_norm(b, wb)) in one launch: per-head q and k norms (Qwen3,
    Gemma 3) over rows of one width, each returned in its own shape and dtype (a's)."""
    rows_a, rows_b = _rows(a), _rows(b)
    if rows_a.shape[1] != rows_b.shape[1] or a.dtype != b.dtype:
        raise ValueError(f"rms_norm_pair: rows of {rows_a.shape[1]} and {rows_b.shape[1]} "
                         f"({a.dtype}, {b.dtype}) are not one width and dtype")
    out_a, out_b = torch.empty(rows_a.shape, dtype=a.dtype, device=a.device), torch.empty(
        rows_b.shape, dtype=b.dtype, device=b.device)
    n_cols = rows_a.shape[1]
    block = triton.next_power_of_2(n_cols)
    _rms_norm_pair_kernel[(rows_a.shape[0] + rows_b.shape[0],)](
        rows_a, rows_b, wa.contiguous(), wb.contiguous(), out_a, out_b, rows_a.shape[0], n_cols,
        rows_a.stride(0), rows_b.stride(0), float(eps), BLOCK=block, num_warps=min(16, max(1, block // 256)),
        **pdl.options(a.device))
    return out_a.view(a.shape), out_b.view(b.shape)


def gated_activation(h: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up for h = [..., gate | up] (the fused projection's output), in h's dtype."""
    rows = _rows(h)
    n_cols = rows.shape[1] // 2
    out = torch.empty((rows.shape[0], n_cols), dtype=h.dtype, device=h.device)
    block = min(1024, triton.next_power_of_2(n_cols))
    _gated_kernel[(rows.shape[0], triton.cdiv(n_cols, block))](
        rows, out, n_cols, rows.stride(0), out.stride(0), GATE=gate_code(kind), BLOCK=block,
        num_warps=4, **pdl.options(h.device))
    return out.view(*h.shape[:-1], n_cols)
