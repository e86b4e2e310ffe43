"""Log-probabilities of a sampled token on the llama.cpp engine (OpenAI logprobs, llama.cpp n_probs).

Read from the logits of the sequence's batch row (the model's own distribution, before any
temperature or filter, as OpenAI reports), log-softmaxed in numpy: ~0.3 ms for
a 49k vocabulary, paid only by requests that ask.
"""
from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from engines.llamacpp.native import token_piece
from engines.types import TokenLogprob


def _text(vocab, token: int) -> str:
    return token_piece(vocab, token, special=True).decode("utf-8", "replace")


def token_logprob(ctx, vocab, token: int, top_n: int, index: int = -1) -> TokenLogprob:
    """index: the batch row whose logits the token was sampled from (-1: the last)."""
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    ptr = llama_cpp.llama_get_logits_ith(ctx, index)
    logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
    shifted = logits.astype(np.float64) - logits.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top: tuple[tuple[str, float], ...] = ()
    if top_n > 0:
        best = np.argpartition(-logprobs, min(top_n, n_vocab) - 1)[:top_n]
        best = best[np.argsort(-logprobs[best])]
        top = tuple((_text(vocab, int(i)), float(logprobs[i])) for i in best)
    return TokenLogprob(_text(vocab, token), float(logprobs[token]), top)
