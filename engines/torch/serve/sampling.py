"""Choosing the next token from logits, per request: penalties, top-k, top-p, min-p,
temperature, then greedy argmax or a seeded draw.

The order follows llama.cpp's default sampler chain (penalties -> top_k -> top_p
-> min_p -> temperature -> dist), so the same parameters mean the same thing on
both engines. A batch whose rows are all greedy with no penalties takes one
batched argmax: that is the decode hot path of benchmarks and editors, and a
per-row Python loop would cost more than the step itself on the GPU.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engines.types import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """One generator per request, so a seeded request draws the same tokens
    whatever else is batched with it."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def has_penalties(params: SamplingParams) -> bool:
    return (params.repeat_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, history: Sequence[int]) -> torch.Tensor:
    """llama.cpp's penalties over the last repeat_last_n tokens. logits: [V], modified copy."""
    if not has_penalties(params):
        return logits
    window = list(history[-params.repeat_last_n:]) if params.repeat_last_n > 0 else list(history)
    if not window:
        return logits
    ids = torch.tensor(window, dtype=torch.long, device=logits.device)
    counts = torch.zeros_like(logits).index_add_(0, ids, torch.ones_like(ids, dtype=logits.dtype))
    seen = counts > 0
    out = logits.clone()
    if params.repeat_penalty != 1.0:
        # Divide positive logits and multiply negative ones: both make the token less likely.
        penalized = torch.where(out > 0, out / params.repeat_penalty, out * params.repeat_penalty)
        out = torch.where(seen, penalized, out)
    out = out - counts * params.frequency_penalty - seen.to(out.dtype) * params.presence_penalty
    return out


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """top_k -> top_p -> min_p -> temperature over one row [V]; removed tokens get -inf."""
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Keep the smallest set whose mass reaches top_p: a token goes when the mass before it already does.
        remove_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        remove = torch.zeros_like(remove_sorted).scatter(0, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits / params.temperature


def sample_row(logits: torch.Tensor, params: SamplingParams, history: Sequence[int],
               generator: torch.Generator | None) -> int:
    """The next token for one sequence. logits: [V]."""
    logits = apply_penalties(logits.float(), params, history)
    if params.is_greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """The next token of each row. logits: [B, V]; one params/history/generator per row."""
    assert logits.shape[0] == len(params) == len(histories) == len(generators)
    if all(p.is_greedy and not has_penalties(p) for p in params):
        return torch.argmax(logits, dim=-1).tolist()
    return [sample_row(logits[i], params[i], histories[i], generators[i]) for i in range(len(params))]
