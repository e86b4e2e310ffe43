"""One llama.cpp context over a loaded model, and the tokens its KV cache holds.

The session remembers which tokens sit in the KV cache, so a request whose
prompt starts with them (the next turn of a conversation) evaluates only what
is new: `prepare` keeps the common prefix and drops the rest. Every native call
on the context happens on the engine's single worker thread (worker.py).
Counting what is decoded here is what makes "no new prefill after resume"
measurable.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import llama_cpp
from llama_cpp import _internals as internals

from engines.errors import ModelLoadError


@dataclass(frozen=True)
class Prepared:
    cached: int      # prompt tokens whose KV was already there
    to_eval: list[int]


def kv_bytes_per_token(model: internals.LlamaModel) -> int:
    """K and V of one token over all layers, f16 (llama.cpp's default cache type)."""
    n_layer = llama_cpp.llama_model_n_layer(model.model)
    n_head = max(1, llama_cpp.llama_model_n_head(model.model))
    n_head_kv = llama_cpp.llama_model_n_head_kv(model.model)
    head_dim = llama_cpp.llama_model_n_embd(model.model) // n_head
    return n_layer * 2 * n_head_kv * head_dim * 2


class Session:
    """A context, a batch, and the token list mirroring the KV cache (position i = tokens[i])."""

    def __init__(self, model: internals.LlamaModel, params: llama_cpp.llama_context_params) -> None:
        try:
            self.ctx = internals.LlamaContext(model=model, params=params, verbose=False)
        except ValueError as exc:  # llama_init_from_model returned NULL (out of memory, bad params)
            raise ModelLoadError(f"llama.cpp could not create a context of {params.n_ctx} tokens: {exc}") from exc
        self.model = model
        self.n_ctx = self.ctx.n_ctx()
        self.n_batch = int(params.n_batch)
        self.batch = internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.tokens: list[int] = []
        self.num_evaluated = 0       # tokens decoded over this session's life (tests, benchmarks)

    def prepare(self, prompt: list[int]) -> Prepared:
        """Keep the KV of the longest common prefix; the last prompt token is always
        evaluated again when everything matched, because sampling needs its logits."""
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)
        if common < len(self.tokens):
            if not self.ctx.kv_cache_seq_rm(0, common, -1):
                common = 0
                self.ctx.kv_cache_clear()
            del self.tokens[common:]
        return Prepared(cached=common, to_eval=prompt[common:])

    def decode(self, tokens: list[int], cancelled: threading.Event | None = None) -> int:
        """Append tokens to the KV cache, n_batch at a time; logits for the last one only.
        Returns how many were decoded (fewer when cancelled between batches)."""
        done = 0
        for start in range(0, len(tokens), self.n_batch):
            if cancelled is not None and cancelled.is_set():
                break
            chunk = tokens[start:start + self.n_batch]
            self.batch.set_batch(batch=chunk, n_past=len(self.tokens), logits_all=False)
            self.ctx.decode(self.batch)
            self.tokens.extend(chunk)
            done += len(chunk)
        self.num_evaluated += done
        return done

    def clear(self) -> None:
        self.ctx.kv_cache_clear()
        self.tokens.clear()

    def save_state(self) -> bytes:
        """The whole context state (KV cells in use, last logits) as host bytes."""
        size = llama_cpp.llama_state_get_size(self.ctx.ctx)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_get_data(self.ctx.ctx, buf, size)
        if written <= 0 or written > size:
            raise RuntimeError(f"llama_state_get_data wrote {written} of {size} bytes")
        return bytes(memoryview(buf)[:written])

    def load_state(self, state: bytes, tokens: list[int]) -> None:
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        read = llama_cpp.llama_state_set_data(self.ctx.ctx, buf, len(state))
        if read != len(state):
            raise RuntimeError(f"llama_state_set_data read {read} of {len(state)} bytes")
        self.tokens = list(tokens)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
