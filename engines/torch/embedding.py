"""One text's embedding on the torch engine: the last hidden state, pooled as the GGUF declares.

Runs the model over a private contiguous KV of the text's length, so no slot's KV
is touched; the caller holds the serving loop between steps.
"""
from __future__ import annotations

import torch

from engines.torch.ggml.numerics import kv_cache_dtype
from engines.torch.model.attention import ContiguousKV
from engines.torch.model.norms import add_then_norm

# llama.cpp's pooling types (GGUF `pooling_type`): 1 mean, 2 CLS (first token), 3 last token.
POOL_MEAN, POOL_CLS, POOL_LAST = 1, 2, 3


@torch.inference_mode()
def pooled_embedding(model, ids: list[int], pooling: int = POOL_MEAN) -> torch.Tensor:
    """The L2-normalized embedding [dim] (on the CPU) of token ids, pooled as `pooling` says
    (mean for any other value)."""
    cfg = model.cfg
    # In the slots' dtype (float16 on the llama.cpp-numerics path, whose attention is
    # ggml's over an f16 cache, as when generating).
    kv = ContiguousKV(cfg.num_layers, 1, cfg.num_kv_heads, len(ids), cfg.head_dim,
                      kv_cache_dtype(model), model.device)
    input_ids = torch.tensor([ids], device=model.device)
    positions = torch.arange(len(ids), device=model.device).unsqueeze(0)
    x, pending = model.hidden(input_ids, positions, kv)
    hidden = add_then_norm(model.model.norm, x, pending)[1].float()[0]   # [T, dim]
    pooled = {POOL_CLS: hidden[0], POOL_LAST: hidden[-1]}.get(pooling, hidden.mean(dim=0))
    return torch.nn.functional.normalize(pooled, dim=0).cpu()
