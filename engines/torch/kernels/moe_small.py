"""One launch each for an MoE layer's routing and its experts' weighted sum, eager on the GPU.

Why: at batch 1 a Qwen3-30B-A3B step is bound by its number of kernels, not its bytes
(48 layers, ~3 GB of weights a token read in well under 1 ms on the H100, against a
4.9 ms step: benchmarks/results/quant_decode_moe_h100.json). Around the experts' three
matvecs, torch ran the routing as six launches (the logits' cast, softmax, top-k,
sum, divide) and the combine as four (cast, multiply, sum, cast back): ten a layer,
~480 a step, each ~3 us inside a CUDA graph. Here:

- `router_logits(x, weight)`: the router's matvec, float32 logits (cuBLAS took ~5 us a
  layer on the H200 for this 128 x 2048 bf16 weight, 240 us of a 3.2 ms step:
  logs/profile_moe_h200.log); one program an expert row and token, each reading its
  row once (a latency-bound read of 512 KB spread over the SMs);
- `route(logits, k, renormalize)`: softmax over the router's logits in float32, the
  top k, renormalized to sum 1 where the family says so (llama.cpp's build_moe_ffn
  for Mixtral and Qwen3-MoE): one program a token;
- `combine(y, weights)`: out[t] = sum_j weights[t, j] * y[t * k + j] in float32,
  rounded once to y's dtype: one program a (token, column block).

Both compute what moe.py's torch ops compute (float32 inside, the same single
rounding); ties in the top k may pick another of the equal experts than torch.topk
(its order is unspecified there too). `usable` (fused_small's) says where: eager on
CUDA; under torch.compile Inductor fuses the torch ops itself.
"""
from __future__ import annotations

import torch

from engines.torch.kernels.fused_small import usable
from engines.torch.kernels.quant_decode import tl, triton

__all__ = ["combine", "route", "router_logits", "usable"]
MAX_EXPERTS = 1024    # one program holds a token's logits in registers up to this
ROUTER_MAX_TOKENS = 8  # router_logits reads the router once a token: decode's batch; a prompt takes cuBLAS


if triton is not None:
    @triton.jit
    def _route_kernel(logits_ptr, ids_ptr, weights_ptr, n_experts, row_stride,
                      K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        # BLOCK_K: K rounded up to a power of 2 (Triton's ranges are; a family may route to 3 or 6)
        token = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        live = cols < n_experts
        logits = tl.load(logits_ptr + token * row_stride + cols, mask=live, other=float("-inf")).to(tl.float32)
        e = tl.exp(logits - tl.max(logits, axis=0))
        probs = e / tl.sum(e, axis=0)
        left = tl.where(live, probs, -1.0)          # probabilities are >= 0: -1 marks taken or absent
        picks = tl.arange(0, BLOCK_K)
        chosen_ids = tl.zeros([BLOCK_K], dtype=tl.int64)
        chosen = tl.zeros([BLOCK_K], dtype=tl.float32)
        for j in tl.static_range(K):
            best = tl.max(left, axis=0)
            at = tl.min(tl.where(left == best, cols, BLOCK), axis=0)     # the lowest index of the largest
            chosen_ids = tl.where(picks == j, at.to(tl.int64), chosen_ids)
            chosen = tl.where(picks == j, best, chosen)
            left = tl.where(cols == at, -1.0, left)
        if RENORMALIZE:
            chosen = chosen / tl.sum(chosen, axis=0)
        tl.store(ids_ptr + token * K + picks, chosen_ids, mask=picks < K)
        tl.store(weights_ptr + token * K + picks, chosen, mask=picks < K)

    @triton.jit(do_not_specialize=["n_experts", "dim"])
    def _router_kernel(x_ptr, w_ptr, out_ptr, n_experts, dim, x_stride, w_stride, out_stride, BK: tl.constexpr):
        row, token = tl.program_id(0), tl.program_id(1)
        acc = tl.zeros([BK], dtype=tl.float32)
        for k0 in range(0, dim, BK):
            cols = k0 + tl.arange(0, BK)
            live = cols < dim
            x = tl.load(x_ptr + token.to(tl.int64) * x_stride + cols, mask=live, other=0.0)
            w = tl.load(w_ptr + row.to(tl.int64) * w_stride + cols, mask=live, other=0.0)
            acc += x.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + token.to(tl.int64) * out_stride + row, tl.sum(acc, axis=0))

    @triton.jit
    def _combine_kernel(y_ptr, w_ptr, out_ptr, n_cols, y_row_stride, out_row_stride,
                        K: tl.constexpr, BLOCK: tl.constexpr):
        token, part = tl.program_id(0), tl.program_id(1)
        cols = part * BLOCK + tl.arange(0, BLOCK)
        live = cols < n_cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            w = tl.load(w_ptr + token * K + j).to(tl.float32)
            y = tl.load(y_ptr + (token * K + j).to(tl.int64) * y_row_stride + cols, mask=live, other=0.0)
            acc += y.to(tl.float32) * w
        tl.store(out_ptr + token.to(tl.int64) * out_row_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=live)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, dim] @ weight [E, dim]^T -> float32 logits [N, E], summed in float32, not rounded."""
    n, dim = x.shape
    experts = weight.shape[0]
    if weight.shape[1] != dim or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"router_logits: x {tuple(x.shape)} and a router of {tuple(weight.shape)}, both row-major")
    out = torch.empty((n, experts), dtype=torch.float32, device=x.device)
    block = min(1024, triton.next_power_of_2(dim))
    _router_kernel[(experts, n)](x, weight, out, experts, dim, x.stride(0), weight.stride(0), out.stride(0),
                                 BK=block, num_warps=4)
    return out


def route(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] -> (expert ids [N, k] int64, weights [N, k] float32), as SparseMoE.route."""
    n, experts = logits.shape
    if not 1 <= k <= experts or experts > MAX_EXPERTS:
        raise ValueError(f"route: top {k} of {experts} experts (one program holds at most {MAX_EXPERTS})")
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    ids = torch.empty((n, k), dtype=torch.int64, device=logits.device)
    weights = torch.empty((n, k), dtype=torch.float32, device=logits.device)
    block = triton.next_power_of_2(experts)
    _route_kernel[(n,)](logits, ids, weights, experts, logits.stride(0), K=k, RENORMALIZE=renormalize,
                        BLOCK=block, BLOCK_K=triton.next_power_of_2(k), num_warps=1 if block <= 256 else 4)
    return ids, weights


def combine(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [N * k, dim] (each token's k experts' outputs, in order), weights [N, k] ->
    [N, dim] in y's dtype: the weighted sum in float32, rounded once."""
    n, k = weights.shape
    if y.shape[0] != n * k or y.stride(-1) != 1:
        raise ValueError(f"combine: {tuple(y.shape)} rows are not {n} tokens' {k} experts, contiguous")
    dim = y.shape[1]
    out = torch.empty((n, dim), dtype=y.dtype, device=y.device)
    block = min(1024, triton.next_power_of_2(dim))
    _combine_kernel[(n, triton.cdiv(dim, block))](y, weights.contiguous(), out, dim, y.stride(0), out.stride(0),
                                                  K=k, BLOCK=block, num_warps=4)
    return out
