"""Mixture of experts (Mixtral, Qwen3-MoE): top-k softmax routing over stacked experts.

Routing as llama.cpp's build_moe_ffn does for both families: softmax over the
router's logits in float32, the top k, renormalized to sum 1 (Mixtral and
Qwen3-MoE both set norm_w), each chosen expert's SwiGLU, summed by weight.

The experts are three stacked 3-D weights [E, out, in] (`ExpertWeights`, a
module with a `.weight`; a quantized file's loader puts a `QuantExperts` in its
place, whose CUDA path is `quant_experts_forward`: qlinear per expert hit when
eager, one launch per projection over every (token, expert) pair inside a graph;
on the CPU its `.weight` is the dense stack). Dense, every step goes through one
function, `experts_forward`. It picks one of three ways, all exact:

- `grouped`: tokens sorted by expert, one GEMM per expert hit. Fewest FLOPs,
  but it reads the routing on the host: eager steps only (prefill, CPU).
- `gathered`: each token's k experts gathered and multiplied batched. No host
  sync (CUDA graphs, torch.compile); reads N*k experts (plus the gather's copy).
- `dense`: every expert on every token, weighted by 0 where not routed. No host
  sync; reads each expert once, cheaper than gathering once N*k >= E
  (Mixtral at batch 8).

Eager on CUDA (the batch-1 graph), the routing and the experts' weighted sum are one
launch each (kernels/moe_small.py), and quantized experts' gate and up write one
[gate | up] buffer the down projection reads gated (quant_experts.gate_up_pairs).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engines.torch.kernels import moe_small, quant_kernels
from engines.torch.kernels.quant_experts import gate_up_pairs
from engines.torch.kernels.quant_ops import gated_activation, qlinear, qlinear_gated
from engines.torch.model.configs import ModelConfig
from engines.torch.model.mlp import ACTIVATIONS
from engines.torch.quant.modules import QuantExperts


class ExpertWeights(nn.Module):
    def __init__(self, num_experts: int, out_dim: int, in_dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_dim, in_dim, device=device))   # [E, out, in]


def _must_not_sync(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _grouped(x, topk_ids, topk_weights, w_gate, w_up, w_down, act) -> torch.Tensor:
    return _by_expert(x, topk_ids, topk_weights,
                      lambda e, xe: (act(xe @ w_gate[e].T) * (xe @ w_up[e].T)) @ w_down[e].T)


def _by_expert(x, topk_ids, topk_weights, expert_mlp) -> torch.Tensor:
    """Tokens sorted by expert; expert_mlp(e, rows of x) for each expert hit, summed by weight."""
    num_tokens, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat).tolist()
    weights = topk_weights.reshape(-1, 1).float()
    out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = order[start:start + count]                     # (token, slot) pairs of this expert
            tokens = rows // k
            xe = x.index_select(0, tokens)                         # [c, dim]
            out.index_add_(0, tokens, expert_mlp(expert, xe).float() * weights[rows])
            start += count
    return out.to(x.dtype)


def _gathered(x, topk_ids, topk_weights, w_gate, w_up, w_down, act) -> torch.Tensor:
    num_tokens, k = topk_ids.shape
    flat = topk_ids.reshape(-1)                                    # [N*k]
    xr = x.repeat_interleave(k, dim=0).unsqueeze(-1)               # [N*k, dim, 1]
    h = act(torch.bmm(w_gate[flat], xr)) * torch.bmm(w_up[flat], xr)   # [N*k, F, 1]
    out = torch.bmm(w_down[flat], h).view(num_tokens, k, -1)       # [N, k, dim]
    return (out.float() * topk_weights.unsqueeze(-1).float()).sum(1).to(x.dtype)


def _dense(x, topk_ids, topk_weights, w_gate, w_up, w_down, act) -> torch.Tensor:
    combine = torch.zeros(x.shape[0], w_gate.shape[0], dtype=torch.float32, device=x.device)
    combine.scatter_(1, topk_ids, topk_weights.float())            # [N, E]
    h = act(torch.matmul(x, w_gate.transpose(1, 2))) * torch.matmul(x, w_up.transpose(1, 2))  # [E, N, F]
    out = torch.matmul(h, w_down.transpose(1, 2))                  # [E, N, dim]
    return torch.einsum("end,ne->nd", out.float(), combine).to(x.dtype)


def experts_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                    act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x [N, dim]; topk_ids, topk_weights [N, k]; w_gate, w_up [E, F, dim]; w_down [E, dim, F].
    Returns sum_j topk_weights[:, j] * expert_{topk_ids[:, j]}(x), [N, dim]."""
    if not _must_not_sync(x):
        return _grouped(x, topk_ids, topk_weights, w_gate, w_up, w_down, act)
    if topk_ids.numel() < w_gate.shape[0]:
        return _gathered(x, topk_ids, topk_weights, w_gate, w_up, w_down, act)
    return _dense(x, topk_ids, topk_weights, w_gate, w_up, w_down, act)


def quant_experts_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          gate_up: tuple[QuantExperts, ...], down: QuantExperts, kind: str) -> torch.Tensor:
    """experts_forward over experts in GGUF blocks, on CUDA; gate_up: (gate, up), or the
    loader's one stack of [gate_e | up_e] rows an expert (gguf_quant); kind: the activation
    (mlp.ACTIVATIONS). Eager (prefill): each expert hit multiplies its tokens through
    qlinear. Inside a graph: every (token, expert) pair's matvec in one launch per
    weight (quant_experts.py), reading the chosen experts only; not compiling (the eager
    graph batch 1 keeps), gate and up write one [gate | up] buffer from one quantized x,
    the down projection computes the activation as it reads it, and one kernel sums the
    pairs by weight (moe_small.combine). Rows the kernels cannot read (K-quant rows not
    whole 256-weight chunks) are dequantized for the step and go the dense way."""
    if not all(quant_kernels.kernel_ready(m.qweight) for m in (*gate_up, down)):
        w_gate, w_up = dense_gate_up(gate_up)
        return experts_forward(x, topk_ids, topk_weights, w_gate, w_up, down.weight, ACTIVATIONS[kind])
    if not _must_not_sync(x):
        return _by_expert(x, topk_ids, topk_weights, lambda e, xe: qlinear_gated(
            torch.cat([qlinear(xe, part.expert(e)) for part in gate_up], dim=-1), down.expert(e), None, kind))
    num_tokens, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    if moe_small.usable(x):
        h = gate_up_pairs(x, [part.qweight for part in gate_up], gate_up[0].num_experts, flat, k)   # [N*k, 2F]
        return moe_small.combine(down.pairs(h, flat, 1, gated=kind), topk_weights)
    # compiled: each weight's pairs one custom op (QuantExperts.pairs); token t's pairs read x[t]
    h = torch.cat([part.pairs(x, flat, k) for part in gate_up], dim=-1) if len(gate_up) > 1 \
        else gate_up[0].pairs(x, flat, k)
    out = down.pairs(gated_activation(h, kind), flat, 1).view(num_tokens, k, -1)      # [N, k, dim]
    return (out.float() * topk_weights.unsqueeze(-1).float()).sum(1).to(x.dtype)


def dense_gate_up(gate_up: tuple[nn.Module, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up stacks [E, F, dim] of (gate, up) or of one [gate_e | up_e] stack (views)."""
    if len(gate_up) == 2:
        return gate_up[0].weight, gate_up[1].weight
    both = gate_up[0].weight
    return both.chunk(2, dim=1)


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.gate_up_proj: ExpertWeights | QuantExperts | None = None   # fuse(): the quantized loader's
        self.gate_proj = ExpertWeights(cfg.num_experts, cfg.ffn_dim, cfg.dim)
        self.up_proj = ExpertWeights(cfg.num_experts, cfg.ffn_dim, cfg.dim)
        self.down_proj = ExpertWeights(cfg.num_experts, cfg.dim, cfg.ffn_dim)

    def fuse(self) -> None:
        """Gate and up as one stack of 2F rows an expert, gate's then up's: where the quantized
        loader stacked them so (engines.torch.load.gguf_quant), on the meta device it fills."""
        if self.gate_up_proj is None:
            experts, ffn, dim = self.gate_proj.weight.shape
            self.gate_up_proj = ExpertWeights(experts, 2 * ffn, dim, device=self.gate_proj.weight.device)
            del self.gate_proj, self.up_proj

    def gate_up(self) -> tuple[nn.Module, ...]:
        return (self.gate_up_proj,) if self.gate_up_proj is not None else (self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up()
        if x.device.type != "cpu" and all(isinstance(m, QuantExperts) for m in (*gate_up, self.down_proj)):
            return quant_experts_forward(x, topk_ids, topk_weights, gate_up, self.down_proj, self.activation)
        w_gate, w_up = dense_gate_up(gate_up)
        return experts_forward(x, topk_ids, topk_weights, w_gate, w_up, self.down_proj.weight,
                               ACTIVATIONS[self.activation])


class SparseMoE(nn.Module):
    """The MLP of an MoE layer: `gate` (the router, [E, dim]) and `experts`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_used, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.dim, cfg.num_experts, bias=False)
        self.experts = Experts(cfg)

    def fuse(self) -> None:
        """Experts stay stacked (one function serves them)."""

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim] -> (expert ids [N, k], weights [N, k] float32)."""
        if moe_small.usable(x) and self.gate.out_features <= moe_small.MAX_EXPERTS:
            if x.shape[0] <= moe_small.ROUTER_MAX_TOKENS and type(self.gate) is nn.Linear:
                logits = moe_small.router_logits(x.contiguous(), self.gate.weight)   # float32, not rounded to bf16
            else:
                logits = self.gate(x)
            return moe_small.route(logits, self.top_k, self.norm_topk_prob)   # one launch, not six
        logits = self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)                  # [N, E]
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])                               # [B*T, dim]
        ids, weights = self.route(flat)
        return self.experts(flat, ids, weights).reshape(x.shape)
