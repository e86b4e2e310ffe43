"""Embeddings from a llama.cpp model: a second, small context with embeddings on.

The generation context keeps logits only; llama.cpp computes pooled embeddings
only in a context made with `embeddings = true`. This one shares the loaded
weights (no second copy), is made on the first embedding request, and is freed
by pause, drop and unload. Each text is pooled as the GGUF declares
(`<arch>.pooling_type`: mean, CLS, last...; mean where it declares none, what
llama.cpp's server and Ollama do for generative models) and L2-normalised, as
the OpenAI and Ollama APIs return them. Its context is the model's served one,
up to `llama_embedding_n_ctx` (a pooled text must fit one micro-batch, whose
compute buffer grows with its square). Runs on the engine's worker thread.
"""
from __future__ import annotations

import math

import llama_cpp
from llama_cpp import _internals as internals

from engines.config import EngineConfig
from engines.errors import ContextOverflow, InvalidRequest
from engines.llamacpp import options
from engines.llamacpp.session import kv_bytes_per_token
from engines.types import EmbeddingResult


def declared_pooling(model: internals.LlamaModel) -> int:
    """The pooling the GGUF declares (llama.cpp's enum), mean where it declares none."""
    meta = model.metadata()
    arch = meta.get("general.architecture", "")
    declared = meta.get(f"{arch}.pooling_type")
    try:
        value = int(declared) if declared is not None else llama_cpp.LLAMA_POOLING_TYPE_NONE
    except ValueError:
        value = llama_cpp.LLAMA_POOLING_TYPE_NONE
    return value if value > llama_cpp.LLAMA_POOLING_TYPE_NONE else llama_cpp.LLAMA_POOLING_TYPE_MEAN


class Embedder:
    def __init__(self, model: internals.LlamaModel, config: EngineConfig, name: str, served_ctx: int) -> None:
        self.model = model
        self.name = name
        n_ctx = min(config.llama_embedding_n_ctx, max(16, served_ctx))
        params = options.context_params(config, n_ctx, embeddings=True)
        params.pooling_type = declared_pooling(model)
        # A pooled embedding needs the whole text in one micro-batch.
        params.n_batch = params.n_ubatch = n_ctx
        self.ctx = internals.LlamaContext(model=model, params=params, verbose=False)
        self.n_ctx = self.ctx.n_ctx()
        self.batch = internals.LlamaBatch(n_tokens=self.n_ctx, embd=0, n_seq_max=1, verbose=False)
        self.n_embd = model.n_embd()
        self.kv_bytes = self.n_ctx * kv_bytes_per_token(model)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(model.vocab))

    def embed(self, texts: list[str], truncate: bool = False) -> EmbeddingResult:
        if not texts:
            raise InvalidRequest("no input to embed")
        vectors, num_tokens = [], 0
        for index, text in enumerate(texts):
            tokens = self.model.tokenize(text.encode("utf-8"), self._add_bos, False)
            if not tokens:
                raise InvalidRequest(f"input {index} is empty; every input must have some text")
            if len(tokens) > self.n_ctx and truncate:
                tokens = tokens[:self.n_ctx]
            if len(tokens) > self.n_ctx:
                raise ContextOverflow(f"input {index} is {len(tokens)} tokens; {self.name} embeds at most "
                                      f"{self.n_ctx} (llama_embedding_n_ctx)")
            vectors.append(self._embed_one(tokens))
            num_tokens += len(tokens)
        return EmbeddingResult(vectors=tuple(vectors), prompt_tokens=num_tokens)

    def _embed_one(self, tokens: list[int]) -> tuple[float, ...]:
        self.ctx.kv_cache_clear()
        self.batch.reset()
        self.batch.add_sequence(tokens, 0, True)
        self.ctx.decode(self.batch)
        pooled = llama_cpp.llama_get_embeddings_seq(self.ctx.ctx, 0)
        values = [float(pooled[i]) for i in range(self.n_embd)]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return tuple(v / norm for v in values)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
