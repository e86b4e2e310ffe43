"""Attention over a KV cache that lives outside the model.

The model computes q, k, v for the new tokens and hands them to a `KVAccess`,
which writes k, v into its cache at the tokens' positions and returns the
attention output. The model never owns KV memory: the serving side plugs in
kvcached virtual tensors (strided per-layer views of a token-major region),
tests plug in `ContiguousKV`. Both reuse `write_kv` and `cache_attention`.

Conventions (the contract with the serving side):
- q [B, Hq, T, D]; k, v [B, Hkv, T, D]; positions [B, T] int64, the absolute
  position of every new token in its sequence (also its cache index).
- A key at cache index j is visible to a query at position p iff j <= p. So a
  row's history must already be in the cache at 0..p-1, and nothing needs a
  length mask: stale data past a sequence's end is never read.
- Padding (ragged rows in one batch): give pad tokens positions *after* the
  row's real tokens (e.g. all equal to the row's length, which must be <
  the cache capacity) and ignore their outputs. They write junk past the end
  of the sequence, which the next real token overwrites before anyone reads it.
- A layer that computes attention its own way says so in its spec
  (`AttnSpec.attention`): the llama.cpp-numerics layer (engines.torch.ggml)
  passes ggml's bit-exact attention there. Nothing here looks at dtypes to
  guess which numerics a model wants.
- GQA without copying K/V: the Hq/Hkv query heads of one group are folded into
  the query-length axis ([B, Hkv, G*T, D]), so every SDPA backend sees plain
  multi-head attention and the cache is read once (no repeat_interleave).
- Each layer says what its attention needs beyond q, k, v in an `AttnSpec`:
  the query scale (Gemma's query_pre_attn_scalar), the logit soft-cap
  (Gemma 2: cap * tanh(s / cap) on the scaled scores, as llama.cpp applies it
  before the mask), the sliding window (a key j is seen from position p iff
  j <= p and p - j < window: llama.cpp's LLAMA_SWA_TYPE_STANDARD), and the
  dims RoPE turns (Phi-4-mini rotates 96 of 128).
"""
from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttnSpec:
    """One layer's attention beyond q, k, v (the model sets it, every KVAccess honours it)."""
    scale: float = 0.0        # 0: 1/sqrt(head_dim)
    softcap: float = 0.0      # 0: none
    window: int = 0           # sliding window in tokens; 0: global
    rope_dim: int = 0         # dims of a head RoPE turns, as pairs (i, i + rope_dim/2); 0: all
    # The layer's own attention over the cache, in place of SDPA: (q, k_cache, v_cache,
    # mask, read_len) -> [B, Hq, T, D]. The llama.cpp-numerics layer sets ggml's (exact,
    # CPU, never compiled); None: cache_attention's.
    attention: Callable[..., torch.Tensor] | None = None

    @property
    def is_plain(self) -> bool:
        return not (self.scale or self.softcap or self.window or self.rope_dim or self.attention)


PLAIN = AttnSpec()


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             positions: torch.Tensor) -> None:
    """Write new k, v [B, Hkv, T, D] into caches [B, Hkv, S, D] at positions [B, T].
    Caches may be strided views (virtual tensors); only index_put_ touches them."""
    batch = torch.arange(k.shape[0], device=k.device).unsqueeze(1).expand_as(positions)
    # Advanced indices separated by a slice put their dims first: target [B, T, Hkv, D].
    k_cache[batch, :, positions] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache[batch, :, positions] = v.transpose(1, 2).to(v_cache.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int = 0) -> torch.Tensor:
    """x [B, H, T, D]; rotate-half RoPE over the first rope_dim dims (0: all) in
    float32, back to x's dtype. cos, sin [B, 1, T, D] are (1, 0) past rope_dim."""
    xf = x.float()
    turned = rope_dim or xf.shape[-1]
    half = turned // 2
    rotated = torch.cat((-xf[..., half:turned], xf[..., :half], xf[..., turned:]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, rope_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, T, D] and k [B, Hkv, T, D] rotated as one tensor: one fused kernel, not two."""
    return apply_rotary(torch.cat((q, k), dim=1), cos, sin, rope_dim).split([q.shape[1], k.shape[1]], dim=1)


def causal_mask(positions: torch.Tensor, read_len: int) -> torch.Tensor:
    """Boolean mask [B, 1, T, read_len]: True where key index j <= query position."""
    keys = torch.arange(read_len, device=positions.device)
    return (keys.view(1, 1, 1, -1) <= positions.unsqueeze(1).unsqueeze(-1))


def window_mask(mask: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """mask [B, 1, T, S] narrowed to keys j with p - j < window (positions [B, T])."""
    keys = torch.arange(mask.shape[-1], device=mask.device)
    return mask & (keys.view(1, 1, 1, -1) > (positions.unsqueeze(1).unsqueeze(-1) - window))


def cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    mask: torch.Tensor | None, read_len: int, spec: AttnSpec = PLAIN,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, T, D] over cache[:, :, :read_len] -> [B, Hq, T, D].

    mask [B, 1, T, read_len] (from `causal_mask`, shared across layers), or None
    when every query sees all read_len keys (one decode token per row at
    position read_len - 1): then SDPA runs unmasked and can pick flash.
    A sliding window narrows the mask (positions [B, T] needed), or without a
    mask reads only the window's last keys.
    """
    if spec.attention is not None:
        return spec.attention(q, k_cache, v_cache, mask, read_len)
    bsz, num_heads, t, d = q.shape
    num_kv = k_cache.shape[1]
    group = num_heads // num_kv
    first = 0
    if spec.window and mask is None:
        first = max(0, read_len - spec.window)
    elif spec.window:
        mask = window_mask(mask, positions, spec.window)
    keys = k_cache[:, :, first:read_len].to(q.dtype)    # [B, Hkv, S, D]; a view when dtypes match
    values = v_cache[:, :, first:read_len].to(q.dtype)
    qg = q.reshape(bsz, num_kv, group * t, d)             # [B, Hkv, G*T, D]
    if mask is not None:
        mask = mask.expand(bsz, 1, t, read_len).repeat(1, 1, group, 1)  # [B, 1, G*T, S]
    scale = spec.scale or 1.0 / math.sqrt(d)
    if spec.softcap:
        out = softcapped_attention(qg, keys, values, mask, scale, spec.softcap)
    else:
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(bsz, num_heads, t, d)


def softcapped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         mask: torch.Tensor | None, scale: float, cap: float) -> torch.Tensor:
    """Attention with Gemma 2's logit soft-cap, which no SDPA backend takes: scores in
    float32, cap * tanh(s * scale / cap), then the mask and softmax. [B, H, T, D]."""
    scores = (q.float() @ keys.float().transpose(-1, -2)) * scale     # [B, H, T, S]
    scores = cap * torch.tanh(scores / cap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ values.float()).to(q.dtype)


class KVAccess(abc.ABC):
    """Where a model's layers keep and read their K/V. One forward calls
    `begin` once, then `attend` once per layer in order."""

    def begin(self, positions: torch.Tensor) -> None:
        """Called once per forward before layer 0, e.g. to build a shared mask."""

    @abc.abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, spec: AttnSpec = PLAIN) -> torch.Tensor:
        """Write k, v [B, Hkv, T, D] at positions [B, T]; return attention of
        q [B, Hq, T, D] over the cache -> [B, Hq, T, D], as spec says."""

    def attend_rotary(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      spec: AttnSpec = PLAIN) -> torch.Tensor:
        """`attend` with q and k not yet rotated (cos, sin [B, 1, T, D] from the model's
        Rotary). Here: rotate q and k, then attend; a KVAccess whose kernel rotates
        as it attends overrides this."""
        return self.attend(layer, *rotate_qk(q, k, cos, sin, spec.rope_dim), v, positions, spec)


class ContiguousKV(KVAccess):
    """Plain preallocated tensors [B, Hkv, S, D] per layer: tests, CPU runs, and
    the static-KV baseline of the benchmarks. Row b of the batch is sequence b."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 read_len: int | None = None) -> None:
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        # A fixed read_len (e.g. max_len) avoids a host sync per forward: CUDA graphs.
        self.fixed_read_len = read_len
        self._read_len = 0
        self._mask: torch.Tensor | None = None

    def begin(self, positions: torch.Tensor) -> None:
        self._read_len = self.fixed_read_len or int(positions.max().item()) + 1
        is_single_decode = positions.shape == (1, 1) and self.fixed_read_len is None
        self._mask = None if is_single_decode else causal_mask(positions, self._read_len)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, spec: AttnSpec = PLAIN) -> torch.Tensor:
        write_kv(self.k[layer], self.v[layer], k, v, positions)
        return cache_attention(q, self.k[layer], self.v[layer], self._mask, self._read_len, spec, positions)
