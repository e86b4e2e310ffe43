"""Sampling: each filter does what llama.cpp's does, seeds repeat, greedy is argmax."""
from __future__ import annotations

import torch

from engines.torch.serve.sampling import apply_penalties, filter_logits, make_generator, sample, sample_row
from engines.types import SamplingParams

CPU = torch.device("cpu")


def test_greedy_batch_is_argmax_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    p = SamplingParams(temperature=0)
    assert sample(logits, [p, p], [[], []], [None, None]) == [1, 0]


def test_top_k_keeps_k_best():
    out = filter_logits(torch.tensor([1.0, 4.0, 3.0, 2.0]), SamplingParams(top_k=2, top_p=1.0, min_p=0, temperature=1))
    assert torch.isfinite(out).tolist() == [False, True, True, False]


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    out = filter_logits(logits, SamplingParams(top_k=0, top_p=0.8, min_p=0, temperature=1))
    assert torch.isfinite(out).tolist() == [True, True, False, False]


def test_min_p_drops_tokens_far_below_the_best():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    out = filter_logits(logits, SamplingParams(top_k=0, top_p=1.0, min_p=0.2, temperature=1))
    assert torch.isfinite(out).tolist() == [True, True, False, False]


def test_penalties_lower_repeated_tokens_only():
    logits = torch.tensor([2.0, -2.0, 2.0, 1.0])
    p = SamplingParams(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, p, [0, 1, 1])
    assert torch.allclose(out, torch.tensor([2 / 2 - 0.5 - 0.25, -2 * 2 - 0.5 - 0.5, 2.0, 1.0]))


def test_repeat_window_only_sees_last_n():
    p = SamplingParams(repeat_penalty=2.0, repeat_last_n=1)
    out = apply_penalties(torch.tensor([2.0, 2.0]), p, [0, 1])
    assert out.tolist() == [2.0, 1.0]


def test_seed_repeats_and_differs():
    torch.manual_seed(0)
    logits = torch.randn(1000)
    p = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0)
    draw = lambda seed: [sample_row(logits, p, [], g) for g in [make_generator(seed, CPU)] for _ in range(20)]
    assert draw(42) == draw(42)
    assert draw(42) != draw(43)


def test_mixed_batch_samples_each_row_with_its_own_params():
    logits = torch.tensor([[0.0, 9.0, 0.0], [1.0, 0.0, 9.0]])
    greedy = SamplingParams(temperature=0)
    hot = SamplingParams(temperature=0.5, top_k=1)  # top_k 1 is greedy too
    pen = SamplingParams(temperature=0, repeat_penalty=100.0)
    assert sample(logits, [greedy, pen], [[], [2]], [None, None]) == [1, 0]
    assert sample(logits, [hot, greedy], [[], []], [make_generator(1, CPU), None]) == [1, 2]
