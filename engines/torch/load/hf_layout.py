"""HF checkpoint tensors -> the model's own layout, where a family stores them otherwise.

- Gemma 2/3 norms: HF computes x * (1 + w) and stores w; the model (like
  llama.cpp, whose converter adds the 1) multiplies by the stored sum.
- Experts: one tensor per expert (Qwen3-MoE `mlp.experts.E.gate_proj`, Mixtral
  `block_sparse_moe.experts.E.w1/w3/w2`) -> stacked `mlp.experts.gate_proj.weight`
  [E, out, in]; Mixtral's router `block_sparse_moe.gate` -> `mlp.gate`.
"""
from __future__ import annotations

import re

import torch

from engines.torch.model.configs import ModelConfig
from engines.torch.model.families import FAMILIES

# per-expert HF names -> the stacked module (w1 gate, w3 up, w2 down: Mixtral's names)
_EXPERT_PARTS = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
                 "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_RE = re.compile(r"(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")


def _offset_norms(state: dict[str, torch.Tensor], offset: float) -> None:
    for name, tensor in state.items():
        if name.endswith("norm.weight"):
            state[name] = tensor + offset


def _stack_experts(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        m = _EXPERT_RE.match(name)
        if m is None or m.group(3) not in _EXPERT_PARTS:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = tensor
            continue
        key = f"{m.group(1)}.mlp.experts.{_EXPERT_PARTS[m.group(3)]}.weight"
        parts.setdefault(key, {})[int(m.group(2))] = tensor
    for key, experts in parts.items():
        if sorted(experts) != list(range(num_experts)):
            continue        # build_model names what is missing
        out[key] = torch.stack([experts[e] for e in range(num_experts)])
    return out


def to_model_layout(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    offset = FAMILIES[cfg.arch].hf_norm_offset
    if offset:
        _offset_norms(state, offset)
    return _stack_experts(state, cfg.num_experts) if cfg.num_experts else state
