"""Stacked experts in GGUF blocks: each (token, expert) pair's matrix-vector, one launch.

An MoE layer's experts are three stacked weights [E, out, in] (llama.cpp's
ffn_gate_exps, ffn_up_exps, ffn_down_exps), kept here as one `QuantWeight` of
E * out rows (the file's own row order: expert-major). At decode, which experts a
token needs is known only on the device (the router's top k), and a step inside a
CUDA graph may not ask the host. So `qmatvec_experts` runs quant_kernels' matvec
with a third program axis over the pairs: each program reads its pair's expert id
from device memory and offsets the weight's planes by that expert's first row,
reading only the experts chosen (as llama.cpp's mul_mat_id), each once per pair. The
types quant_dp4a serves (Q4_K, Q6_K, Q4_0, Q8_0) go through its integer-dot kernels
the same way (x quantized to int8 once; at 6,144 rows of work a projection, more than
the 4,096 from which dp4a beat the float matvec at one row of x in the H100 sweep);
the other block types through the float matvec.

Pair p reads row p // x_div of x: the gate and up projections of token t's k
pairs all read x[t] (x_div = k); the down projection reads its own pair's
activation (x_div = 1). Under torch.compile the call is one opaque op
(`ebbtide::qexperts`), as qlinear is. Elsewhere (the CPU, no Triton) the
reference path dequantizes each pair's expert in float32.
"""
from __future__ import annotations

import torch

from engines.torch.kernels import quant_dp4a, quant_kernels
from engines.torch.kernels.gated_input import gate_code
from engines.torch.kernels.quant_ops import gated_activation
from engines.torch.kernels.quant_weight import QuantWeight, interleave_stacks


def qmatvec_experts_reference(x: torch.Tensor, w: QuantWeight, num_experts: int, ids: torch.Tensor,
                              x_div: int) -> torch.Tensor:
    rows = w.shape[0] // num_experts
    out = [x[p // x_div].float() @ w.row_slice(e * rows, (e + 1) * rows).dequantize(torch.float32).t()
           for p, e in enumerate(ids.tolist())]
    return torch.stack(out).to(x.dtype) if out else x.new_empty((0, rows))


def _launch(x: torch.Tensor, w: QuantWeight, num_experts: int, ids: torch.Tensor, x_div: int,
            out: torch.Tensor | None = None, gated: str | None = None) -> torch.Tensor:
    block_n, chunks_per_step, num_warps = quant_kernels.LAUNCH.get(w.type_name, quant_kernels.DEFAULT_LAUNCH)[:3]
    pairs, n, k = ids.numel(), w.shape[0] // num_experts, w.shape[1]
    x = x.contiguous()
    planes, strides = quant_kernels.plane_args(w)
    cdiv = quant_kernels.triton.cdiv
    # No K split: the pairs' programs fill the SMs.
    chunks_per_split = cdiv(cdiv(k, quant_kernels.CHUNK), chunks_per_step) * chunks_per_step
    if out is None:
        out = torch.empty((pairs, n), dtype=x.dtype, device=x.device)
    quant_kernels._qmv_kernel[(cdiv(n, block_n), 1, pairs)](
        x, out, out, *planes, *strides, 1, n, k, x.stride(0), 0, out.stride(0), chunks_per_split, HAS_BIAS=False,
        **quant_kernels.kernel_meta(w.type_name, block_n, chunks_per_step, num_warps, 1),
        ids_ptr=ids.contiguous(), x_div=x_div, INDEXED=True, GATE=gate_code(gated))
    return out


def _launch_dp4a(x: torch.Tensor, w: QuantWeight, num_experts: int, ids: torch.Tensor, x_div: int,
                 out: torch.Tensor | None = None, gated: str | None = None,
                 quantized: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """The same pairs on quant_dp4a's integer-dot kernels (x quantized to int8 per 32 once,
    every row of it, or `quantized` already), with the one-row launch: each pair is one row of x."""
    n = w.shape[0] // num_experts
    return quant_dp4a.run_kernel(x, w, n, quant_dp4a.launch_for(w.type_name, 1, n), ids.numel(), gated=gated,
                                 out=out, quantized=quantized, ids_ptr=ids.contiguous(), x_div=x_div, INDEXED=True)


def _experts(x: torch.Tensor, w: QuantWeight, num_experts: int, ids: torch.Tensor, x_div: int,
             out: torch.Tensor | None = None, gated: str | None = None) -> torch.Tensor:
    """gated: x's rows are [gate | up] and each pair reads act(gate) * up (gated_input.py)."""
    if x.is_cuda and quant_dp4a.supports(w, 1):
        return _launch_dp4a(x, w, num_experts, ids, x_div, out, gated)
    if x.is_cuda and quant_kernels.kernel_ready(w):
        return _launch(x, w, num_experts, ids, x_div, out, gated)
    y = qmatvec_experts_reference(x if gated is None else gated_activation(x, gated), w, num_experts, ids, x_div)
    return y if out is None else out.copy_(y)


def gate_up_pairs(x: torch.Tensor, parts: list[QuantWeight], num_experts: int,
                  ids: torch.Tensor, x_div: int) -> torch.Tensor:
    """[P, 2 * out] = [gate pairs | up pairs], as a gated MLP's fused gate_up projection
    writes it, for the down projection's gated x loads (`qmatvec_experts(..., gated=)`).
    parts: the loader's one stack of [gate_e | up_e] rows an expert (one launch writes
    both halves), or gate and up apart, each half then written in place; where both
    types run on the integer dots, x is quantized once for the two."""
    # supports() checks the device: CUDA, or the CPU where Triton's interpreter emulates dp4a (the tests)
    if len(parts) == 1:
        if quant_dp4a.supports(parts[0], 1):
            return _launch_dp4a(x, parts[0], num_experts, ids, x_div)
        return _experts(x, parts[0], num_experts, ids, x_div)
    gate, up = parts
    rows = gate.shape[0] // num_experts
    h = torch.empty((ids.numel(), 2 * rows), dtype=x.dtype, device=x.device)
    if quant_dp4a.supports(gate, 1) and quant_dp4a.supports(up, 1) and gate.shape == up.shape:
        quantized = quant_dp4a.quantize_x(x.contiguous().reshape(-1))
        _launch_dp4a(x, gate, num_experts, ids, x_div, h[:, :rows], quantized=quantized)
        _launch_dp4a(x, up, num_experts, ids, x_div, h[:, rows:], quantized=quantized)
        return h
    _experts(x, gate, num_experts, ids, x_div, h[:, :rows])
    _experts(x, up, num_experts, ids, x_div, h[:, rows:])
    return h


def stack_gate_up(gate: QuantWeight, up: QuantWeight, num_experts: int) -> QuantWeight:
    """Gate and up stacks as one of [gate_e | up_e] rows an expert, the loader's layout
    (quant_weight.interleave_stacks): for tests and callers holding the two apart."""
    both = QuantWeight.concat([gate, up])
    return QuantWeight(both.type_name, both.shape,
                       {name: interleave_stacks(p, 2, num_experts) for name, p in both.planes.items()})


@torch.library.custom_op("ebbtide::qexperts", mutates_args=())
def _experts_op(x: torch.Tensor, planes: list[torch.Tensor], type_name: str, rows: int, in_features: int,
                num_experts: int, ids: torch.Tensor, x_div: int) -> torch.Tensor:
    return _experts(x, QuantWeight.from_plane_list(type_name, (rows, in_features), planes), num_experts, ids, x_div)


@_experts_op.register_fake
def _experts_fake(x: torch.Tensor, planes: list[torch.Tensor], type_name: str, rows: int, in_features: int,
                  num_experts: int, ids: torch.Tensor, x_div: int) -> torch.Tensor:
    return x.new_empty((ids.shape[0], rows // num_experts))


def qmatvec_experts(x: torch.Tensor, w: QuantWeight, num_experts: int, ids: torch.Tensor, x_div: int,
                    gated: str | None = None) -> torch.Tensor:
    """x [R, in]; w: E experts stacked, [E * out, in]; ids [P] (an expert per pair) ->
    [P, out], row p = expert ids[p] applied to x[p // x_div]. gated (eager only: compiled
    steps leave the activation to Inductor): x [R, 2 * in] = [gate | up], read as act(gate) * up."""
    if torch.compiler.is_compiling():
        if gated is not None:
            x = gated_activation(x, gated)
        return _experts_op(x, w.plane_list(), w.type_name, *w.shape, num_experts, ids, x_div)
    return _experts(x, w, num_experts, ids, x_div, gated=gated)
