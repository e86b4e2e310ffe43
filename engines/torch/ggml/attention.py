"""llama.cpp's attention on the CPU, bit for bit: the llama.cpp-numerics layer's own attention.

GgmlAttention (layers.py) hands `ggml_attention` to the KV access in its
AttnSpec (`attention`), so model/attention.py runs it in place of SDPA without
knowing about ggml or looking at dtypes. Float32 queries over the float16 KV
cache llama.cpp keeps (numerics.kv_cache_dtype); plain attention only (no
query scale, soft-cap or window: the families this path serves have none).
"""
from __future__ import annotations

import math

import torch

from engines.torch.ggml.math import f16_dot, reduce_add16, v_expf


def ggml_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   mask: torch.Tensor | None, read_len: int) -> torch.Tensor:
    """Attention of float32 q [B, Hq, T, D] over a float16 cache, as llama.cpp computes it on the CPU without flash attention,
    bit for bit (engines.torch.ggml.dot says why that matters):
    kq = mul_mat(K f16, Q rounded to f16), softmax(kq * scale + mask) with
    ggml_v_expf, kqv = mul_mat(V f16, P rounded to f16). Keys are padded with
    masked zeros to a multiple of 64, which adds nothing to any sum. The two
    matmuls sum in the order of the kernel llama.cpp picks (ggml_math.f16_dot):
    tinyBLAS when a sequence brings 2+ tokens, ggml_vec_dot_f16 for one."""
    bsz, num_heads, t, d = q.shape
    group = num_heads // k_cache.shape[1]
    one_token = t == 1
    width = -(-read_len // 64) * 64
    keys = _padded(k_cache, read_len, width).repeat_interleave(group, 1)     # [B, Hq, S, D]
    values = _padded(v_cache, read_len, width).repeat_interleave(group, 1)
    q16 = q.half().float()
    scores = f16_dot(q16[:, :, :, None], keys[:, :, None], one_token) * (1.0 / math.sqrt(d))
    visible = torch.zeros(bsz, 1, t, width, dtype=torch.bool, device=q.device)  # [B, 1, T, S]
    visible[..., :read_len] = True if mask is None else mask
    scores = scores.masked_fill(~visible, float("-inf"))
    e = v_expf(scores - scores.amax(-1, keepdim=True))
    total = torch.cumsum(reduce_add16(e.unflatten(-1, (-1, 16))).double(), dim=-1)[..., -1:]
    probs = (e * (torch.ones_like(total) / total).float()).half().float()    # [B, Hq, T, S]
    return f16_dot(probs[:, :, :, None], values.transpose(-1, -2)[:, :, None], one_token)


def _padded(cache: torch.Tensor, read_len: int, width: int) -> torch.Tensor:
    """cache[:, :, :read_len] as float32, zero rows appended up to width: [B, H, width, D]."""
    out = torch.zeros(cache.shape[0], cache.shape[1], width, cache.shape[3], device=cache.device)
    out[:, :, :read_len] = cache[:, :, :read_len].float()
    return out
