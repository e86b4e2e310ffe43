"""A llama.cpp sampler chain from SamplingParams.

Greedy when temperature is 0 (or top_k is 1), else penalties, top-k, top-p,
min-p, temperature and a seeded draw, in llama.cpp's own order. The chain runs
inside llama.cpp (no logits copied to Python per token).
"""
from __future__ import annotations

import random

import llama_cpp
from llama_cpp import _internals as internals

from engines.types import SamplingParams


def _has_penalties(p: SamplingParams) -> bool:
    return p.repeat_last_n != 0 and (p.repeat_penalty != 1.0 or p.presence_penalty != 0.0
                                     or p.frequency_penalty != 0.0)


def _add_penalties(sampler: internals.LlamaSampler, p: SamplingParams, prompt: list[int]) -> None:
    last_n = p.repeat_last_n if p.repeat_last_n > 0 else 64
    # The binding declares (n_vocab, last_n, repeat, freq, present) while llama.cpp's
    # current header takes (last_n, repeat, freq, present). Ints and floats travel in
    # separate registers on x86-64 and arm64, so passing last_n in both int slots is
    # right under either signature.
    native = llama_cpp.llama_sampler_init_penalties(last_n, last_n, p.repeat_penalty,
                                                    p.frequency_penalty, p.presence_penalty)
    # Penalties see the prompt too, as in llama.cpp's server; fed to this sampler alone
    # (a grammar earlier in the chain must not read the prompt).
    for token in prompt[-last_n:]:
        llama_cpp.llama_sampler_accept(native, token)
    llama_cpp.llama_sampler_chain_add(sampler.sampler, native)


def build_sampler(p: SamplingParams, prompt: list[int], grammar=None) -> internals.LlamaSampler:
    """grammar: a native grammar sampler (grammar.py), first in the chain: it masks what the
    grammar forbids before anything else looks at the logits."""
    sampler = internals.LlamaSampler()
    if grammar is not None:
        llama_cpp.llama_sampler_chain_add(sampler.sampler, grammar)
    if _has_penalties(p):
        _add_penalties(sampler, p, prompt)
    if p.is_greedy:
        sampler.add_greedy()
    else:
        if p.top_k > 0:
            sampler.add_top_k(p.top_k)
        sampler.add_top_p(p.top_p, 1)
        if p.min_p > 0:
            sampler.add_min_p(p.min_p, 1)
        sampler.add_temp(p.temperature)
        sampler.add_dist(p.seed if p.seed is not None else random.getrandbits(32))
    return sampler
