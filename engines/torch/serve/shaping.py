"""What a request asks of a step's logits beyond sampling: a grammar's mask, and logprobs.

Kept out of the plain path: a batch where no request is constrained and none
asks for logprobs gets its logits back untouched (no copy, no softmax).
Logprobs are of the model's own distribution (before the grammar's mask,
temperature and filters), as OpenAI reports them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engines.types import TokenLogprob


def shape_logits(logits: torch.Tensor, jobs: Sequence) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(logits with each guided row masked, each row's log-softmax where its request asks). logits: [B, V]."""
    logprobs = [torch.log_softmax(logits[i].float(), dim=-1) if job.request.top_logprobs >= 0 else None
                for i, job in enumerate(jobs)]
    # Masked in place: the logits are the step's own output (a graph's buffer, rewritten
    # next step), and the logprobs above were taken before.
    for i, job in enumerate(jobs):
        if job.guide is not None:
            job.guide.mask_(logits[i])
    return logits, logprobs


def token_logprob(row: torch.Tensor, token: int, top_n: int, text_of: Callable[[int], str]) -> TokenLogprob:
    top: tuple[tuple[str, float], ...] = ()
    if top_n > 0:
        values, ids = torch.topk(row, min(top_n, row.shape[0]))
        top = tuple((text_of(int(i)), float(v)) for v, i in zip(values.tolist(), ids.tolist()))
    return TokenLogprob(text_of(token), float(row[token]), top)
