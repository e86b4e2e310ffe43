"""The context a model is served with, by default: what it was trained for, bounded.

Bounded by two things: the `max_context` setting (the user's say), and what the
memory broker could ever grant one model's KV cache (`kv_budget_bytes`, the
broker's budget when the daemon knows it, else a quarter of this machine's
RAM). On the torch engine a long context costs nothing until tokens arrive
(kvcached maps KV pages as sequences grow), so the bound only keeps a promise
the broker can keep; llama.cpp allocates its KV buffer whole, so there the
bound is also what it holds. A per-model `context_length` (settings) or the
older `llama_n_ctx` / `torch_max_context` still win where set.
"""
from __future__ import annotations

import os

MIN_CONTEXT = 256


def machine_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):   # not a POSIX system: assume a modest desktop
        return 16 << 30


def served_context(trained: int, max_context: int, kv_bytes_per_token: int,
                   kv_budget_bytes: int | None = None) -> int:
    """min(trained length, max_context setting, tokens the KV budget holds), never below MIN_CONTEXT
    (nor above the trained length)."""
    budget = kv_budget_bytes if kv_budget_bytes is not None else machine_memory_bytes() // 4
    by_memory = budget // kv_bytes_per_token if kv_bytes_per_token > 0 else max_context
    trained = trained if trained > 0 else max_context
    return min(trained, max(MIN_CONTEXT, min(max_context, by_memory)))
