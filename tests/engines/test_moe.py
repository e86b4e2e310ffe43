"""The three ways experts_forward runs a step (grouped on the host, gathered and dense
without a host sync, for CUDA graphs) give the same result as the definition."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engines.torch.model import moe


def test_every_expert_path_equals_the_definition():
    gen = torch.Generator().manual_seed(0)
    experts, dim, ffn, tokens, k = 6, 16, 24, 5, 2
    w_gate, w_up = torch.randn(experts, ffn, dim, generator=gen), torch.randn(experts, ffn, dim, generator=gen)
    w_down = torch.randn(experts, dim, ffn, generator=gen)
    x = torch.randn(tokens, dim, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=gen), -1)
    expected = torch.zeros(tokens, dim)
    for t in range(tokens):
        for j in range(k):
            e = int(ids[t, j])
            expected[t] += weights[t, j] * (w_down[e] @ (F.silu(w_gate[e] @ x[t]) * (w_up[e] @ x[t])))
    for path in (moe._grouped, moe._gathered, moe._dense):
        got = path(x, ids, weights, w_gate, w_up, w_down, F.silu)
        assert torch.allclose(got, expected, atol=1e-4), path.__name__
