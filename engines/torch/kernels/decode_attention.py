"""One Triton kernel for a decode step's attention: write the new K/V into each row's
slot and attend over that slot's history, straight from the strided KV views.

With `cos`/`sin` given, the kernel also applies the rotate-half RoPE to q and the
new k (in float32, rounded back to the cache type, as attention.apply_rotary does):
Inductor's RoPE kernels had been two launches a layer, ~100 us of a ~920 us
SmolLM2-135M step on the H100 with 11 kernels a layer (decode_profile.json).

Measured on the H100 (benchmarks/decode.py, 2026-11-23): with attention as plain
torch ops (two index_put, two index_select, mask, SDPA and its copies) a decode
step spent ~65 us per layer beyond its weight reads, whatever the model: 1.96 ms
a token for SmolLM2-135M, 2 ms over the bandwidth limit for llama-3.1-8b. This
kernel does all of it in one launch per layer, and reads each row's own length
from `positions` on the device, so it needs no mask, no read-length bucket and
no host sync inside a CUDA graph.

One program per (batch row, KV head): the group's query heads ride together
through the history in blocks (online softmax), and the new token's own key
and value are taken from registers, so the kernel never reads what it wrote.
Rows repeated as padding write identical values to the same place. With
`Pieces` (flash decoding) each history is cut into pieces of a few hundred keys,
one program each, and the last program of a row and KV head to finish (an
atomic count) merges their partial softmax sums: a long history is then read
by hundreds of programs, not by the 3-8 a row's KV heads give. Not yet the
engine's default: benchmarks/decode_depth.py measures both against llama.cpp at
4k and 16k tokens of context, and has not run on a GPU yet.

Every family's attention (the layer's `AttnSpec`): any even head dim (Phi-3's
96 runs in a 128-wide block, masked), the query scale, Gemma 2's logit
soft-cap (cap * tanh(s / cap), tanh from exp so the interpreter runs it too),
sliding windows (the loop starts at the window's first key: a sliding layer
reads at most `window` keys however long the sequence), and partial RoPE
(pairs (i, i + rope_dim/2); cos/sin are (1, 0) past rope_dim).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from engines.torch.kernels import pdl
from engines.torch.kernels.pdl import pdl_start, pdl_wait
from engines.torch.model.attention import PLAIN, AttnSpec, apply_rotary, cache_attention

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton; the torch-op path serves
    triton = None


if triton is not None:
    @triton.jit
    def _softcapped(s, cap):
        # cap * tanh(s / cap), with tanh(x) = 1 - 2 / (exp(2x) + 1)
        return cap * (1.0 - 2.0 / (tl.exp(2.0 * s / cap) + 1.0))

    @triton.jit
    def _decode_attention_kernel(
            q_ptr, k_new_ptr, v_new_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
            cos_ptr, sin_ptr,
            q_sb, q_sh, k_sb, k_sh, v_sb, v_sh, c_slot, c_head, c_tok, o_sb, o_sh, cs_b, scale,
            softcap, window, part_ptr, count_ptr, piece,
            GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            ROPE_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ROTARY: tl.constexpr,
            SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, SPLIT: tl.constexpr, USE_PDL: tl.constexpr):
        pdl_start(USE_PDL)
        pdl_wait(USE_PDL)     # pdl.py: q, k, v, positions, slots and the cache are all written before
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        pos = tl.load(pos_ptr + b)
        slot = tl.load(slot_ptr + b)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        g = tl.arange(0, BLOCK_G)
        g_ok = g < GROUP
        k_base = k_cache_ptr + slot * c_slot + h * c_head
        v_base = v_cache_ptr + slot * c_slot + h * c_head
        k_ptrs = k_new_ptr + b * k_sb + h * k_sh
        q_ptrs = q_ptr + b * q_sb + (h * GROUP + g)[:, None] * q_sh
        qd_ok = g_ok[:, None] & d_ok[None, :]
        k_new = tl.load(k_ptrs + d, mask=d_ok, other=0.0)                            # [D]
        q = tl.load(q_ptrs + d[None, :], mask=qd_ok, other=0.0)                      # [G, D]
        if ROTARY:
            # rotate_half over the first ROPE_DIM dims: x[d] pairs with x[d +- ROPE_DIM/2]
            half: tl.constexpr = ROPE_DIM // 2
            turned = d < ROPE_DIM
            d_rot = tl.where(turned, (d + half) % ROPE_DIM, d)
            sign = tl.where(d < half, -1.0, 1.0)
            cos = tl.load(cos_ptr + b * cs_b + d, mask=d_ok, other=1.0)
            sin = tl.load(sin_ptr + b * cs_b + d, mask=d_ok, other=0.0) * sign
            k_rot = tl.load(k_ptrs + d_rot, mask=d_ok, other=0.0).to(tl.float32)
            k_new = (k_new.to(tl.float32) * cos + k_rot * sin).to(k_new.dtype)
            q_rot = tl.load(q_ptrs + d_rot[None, :], mask=qd_ok, other=0.0).to(tl.float32)
            q = (q.to(tl.float32) * cos[None, :] + q_rot * sin[None, :]).to(q.dtype)
        k_new = k_new.to(k_cache_ptr.dtype.element_ty)
        v_new = tl.load(v_new_ptr + b * v_sb + h * v_sh + d, mask=d_ok, other=0.0).to(v_cache_ptr.dtype.element_ty)
        first = 0
        if WINDOW:
            first = tl.maximum(pos - window + 1, 0)            # keys p - window < j <= p
            first = (first // BLOCK_N) * BLOCK_N
        # This program's keys [lo, hi): the whole history, or (SPLIT) its piece of it; the
        # piece holding position pos writes the new token and starts from its score.
        lo, hi = first, pos
        if SPLIT:
            lo, hi = tl.maximum(first, split * piece), tl.minimum(pos, (split + 1) * piece)
            owner = split == pos // piece
            mine = d_ok & ((d * 0 + split) == pos // piece)      # a [D] mask: the owner writes
            tl.store(k_base + pos * c_tok + d, k_new, mask=mine)
            tl.store(v_base + pos * c_tok + d, v_new, mask=mine)
        else:
            tl.store(k_base + pos * c_tok + d, k_new, mask=d_ok)
            tl.store(v_base + pos * c_tok + d, v_new, mask=d_ok)
        # The new token first: its score starts the running max and sum (float32).
        m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale  # [G]
        if SOFTCAP:
            m_i = _softcapped(m_i, softcap)
        l_i = tl.full([BLOCK_G], 1.0, dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32) + v_new.to(tl.float32)[None, :]
        if SPLIT:   # another piece starts empty (a finite floor: exp of it minus any score is 0)
            m_i = tl.where(owner, m_i, -1e30)
            l_i = tl.where(owner, l_i, 0.0)
            acc = tl.where(owner, acc, 0.0)
        # Dots in the cache's 16-bit type on tensor cores, accumulated in float32, as
        # flash attention does: float32 "ieee" dots spilled registers at head_dim 128
        # (117 us a layer for llama-3.1-8b on the H100, decode_profile.json).
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            valid = n < hi
            if WINDOW:
                valid = valid & (n > pos - window)
            kv_ok = valid[:, None] & d_ok[None, :]
            k = tl.load(k_base + n[:, None] * c_tok + d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(v_base + n[:, None] * c_tok + d[None, :], mask=kv_ok, other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale     # [G, N]
            if SOFTCAP:
                s = _softcapped(s, softcap)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out_at = out_ptr + b * o_sb + (h * GROUP + g)[:, None] * o_sh + d[None, :]
        if SPLIT:
            _split_finish(acc, m_i, l_i, out_at, qd_ok, part_ptr, count_ptr, b, h, split, first // piece,
                          pos // piece, BLOCK_G, BLOCK_D)
        else:
            tl.store(out_at, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=qd_ok)

    @triton.jit
    def _split_finish(acc, m_i, l_i, out_at, qd_ok, part_ptr, count_ptr, b, h, split, lo_piece, hi_piece,
                      BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
        """A piece's (m, l, acc) to its row of scratch; the last piece of (b, h) to get there
        (an atomic count) merges them all into the output and zeroes the count for the next
        call. A lone piece (a history of one piece) stores the output itself."""
        if (split >= lo_piece) & (split <= hi_piece):
            if lo_piece == hi_piece:
                tl.store(out_at, (acc / l_i[:, None]).to(out_at.dtype.element_ty), mask=qd_ok)
            else:
                pieces = tl.num_programs(2)
                width: tl.constexpr = BLOCK_G * (BLOCK_D + 2)
                row = (b * tl.num_programs(1) + h) * pieces
                gi = tl.arange(0, BLOCK_G)
                di = tl.arange(0, BLOCK_D)
                at = part_ptr + (row + split).to(tl.int64) * width
                tl.store(at + gi, m_i)
                tl.store(at + BLOCK_G + gi, l_i)
                tl.store(at + 2 * BLOCK_G + gi[:, None] * BLOCK_D + di[None, :], acc)
                counter = count_ptr + b * tl.num_programs(1) + h
                # Every thread's stores before the one atomic (a barrier, then its release): the
                # merger, after its acquire, reads them from L2 (.cg), past its own L1.
                tl.debug_barrier()
                if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == hi_piece - lo_piece:
                    big = tl.full([BLOCK_G], -1e30, dtype=tl.float32)
                    total = tl.zeros([BLOCK_G], dtype=tl.float32)
                    merged = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
                    for p in range(lo_piece, hi_piece + 1):
                        src = part_ptr + (row + p).to(tl.int64) * width
                        m_p = tl.load(src + gi, cache_modifier=".cg")
                        l_p = tl.load(src + BLOCK_G + gi, cache_modifier=".cg")
                        a_p = tl.load(src + 2 * BLOCK_G + gi[:, None] * BLOCK_D + di[None, :], cache_modifier=".cg")
                        m_new = tl.maximum(big, m_p)
                        keep, take = tl.exp(big - m_new), tl.exp(m_p - m_new)
                        total = total * keep + l_p * take
                        merged = merged * keep[:, None] + a_p * take[:, None]
                        big = m_new
                    tl.store(out_at, (merged / total[:, None]).to(out_at.dtype.element_ty), mask=qd_ok)
                    tl.atomic_xchg(counter, 0)


def is_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


@dataclass
class Pieces:
    """Flash decoding: each row's history cut into pieces of `tokens` keys, a program each
    (`count` of them a row and KV head: the longest history's), merged by the last to
    finish. One program a KV head walks a 16k-token history alone (8 programs for an 8B
    model); pieces of 512 keys make 256. A history of one piece costs a row's other
    programs nothing but their start. `counters`: int32 [rows, KV heads], zero between
    calls (the merging program zeroes its own); one per KV store, so two models'
    steps never share one."""
    tokens: int
    count: int
    counters: torch.Tensor

    @classmethod
    def for_cache(cls, max_tokens: int, rows: int, kv_heads: int, device: torch.device,
                  tokens: int = 512) -> Pieces:
        return cls(tokens, -(-max_tokens // tokens), torch.zeros(rows, kv_heads, dtype=torch.int32, device=device))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                     spec: AttnSpec = PLAIN, pieces: Pieces | None = None) -> torch.Tensor:
    """q [B, Hq, 1, D]; k, v [B, Hkv, 1, D]; positions [B, 1]; slots [B];
    caches [S, Hkv, max_ctx, D] (strided, last dim contiguous); cos, sin [B, 1, 1, D]
    float32 (Rotary's output) to rotate q and k here, or None where they already are;
    spec: the layer's scale, soft-cap, window and rotated dims; pieces: split each
    history across programs (Pieces). Returns [B, Hq, 1, D]."""
    bsz, num_heads, _, head_dim = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    out = torch.empty((bsz, num_heads, 1, head_dim), dtype=q.dtype, device=q.device)
    # Strided q/k/v are fine (the model hands over views of one q|k|v projection): the
    # kernel takes their batch and head strides; only the last dim must be contiguous.
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    rotary = cos is not None
    if rotary:
        cos, sin = cos.reshape(bsz, head_dim).float().contiguous(), sin.reshape(bsz, head_dim).float().contiguous()
    else:
        cos = sin = positions        # unused: ROTARY is off
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    block_g, block_d = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(head_dim))
    # Keys a block: 128 at head_dim 64, 64 at 128 (16 KiB of K a block either way); a short
    # history then takes one or two latency-bound trips through memory, not three.
    block_n = max(16, min(128, 8192 // block_d))
    split = pieces is not None and pieces.count > 1
    if split:
        assert pieces.tokens % block_n == 0 and pieces.counters.shape[0] >= bsz
        scratch = torch.empty((bsz * num_kv * pieces.count, block_g * (block_d + 2)), dtype=torch.float32,
                              device=q.device)
        counters = pieces.counters
    else:
        scratch = counters = out            # unused: SPLIT is off
    _decode_attention_kernel[(bsz, num_kv, pieces.count if split else 1)](
        q, k, v, positions.reshape(-1), slots, k_cache, v_cache, out, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        cos.stride(0), spec.scale or 1.0 / math.sqrt(head_dim), spec.softcap or 1.0, spec.window,
        scratch, counters, pieces.tokens if split else 1,
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d, ROPE_DIM=spec.rope_dim or head_dim,
        BLOCK_N=block_n, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ROTARY=rotary, SOFTCAP=bool(spec.softcap), WINDOW=bool(spec.window), SPLIT=split,
        **pdl.options(q.device))
    return out


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        spec: AttnSpec = PLAIN) -> torch.Tensor:
    """The same in plain torch, row by row: the kernel's definition and its test oracle."""
    outs = []
    for b in range(q.shape[0]):
        slot, pos = int(slots[b]), int(positions[b, 0])
        k_cache[slot, :, pos] = k[b, :, 0].to(k_cache.dtype)
        v_cache[slot, :, pos] = v[b, :, 0].to(v_cache.dtype)
        outs.append(cache_attention(q[b:b + 1], k_cache[slot:slot + 1], v_cache[slot:slot + 1], None, pos + 1,
                                    spec))
    return torch.cat(outs)


def self_check(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv: int, head_dim: int,
               specs: tuple[AttnSpec, ...] = (PLAIN,), split: bool = False) -> bool:
    """Run the kernel once against the reference on this device and these shapes (split:
    the histories in pieces of 128 keys); False (and a warning) where it fails or
    differs, so the caller falls back."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        rand = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
        slots_n, ctx = 3, 200
        # A token-major cache like kvcached's: [S, T, L=2, H, D] viewed as [S, H, T, D].
        base = rand(slots_n, ctx, 2, num_kv, head_dim)
        views = [base[:, :, i].permute(0, 2, 1, 3) for i in range(2)]
        # Strided as the model hands them over: q, k and v views of one projection.
        q, k, v = rand(3, num_heads + 2 * num_kv, 1, head_dim).split([num_heads, num_kv, num_kv], dim=1)
        positions = torch.tensor([[0], [130], [130]], device=device)
        slots = torch.tensor([2, 0, 0], device=device)      # a repeated row, as padding makes
        angles = positions.float().unsqueeze(-1) * torch.rand(head_dim // 2, generator=gen).to(device)
        cos, sin = [f(torch.cat((angles, angles), -1)).unsqueeze(1) for f in (torch.cos, torch.sin)]
        worst = 0.0
        for spec in specs:
            rope_dim = spec.rope_dim or head_dim
            cos_s, sin_s = cos.clone(), sin.clone()
            cos_s[..., rope_dim:], sin_s[..., rope_dim:] = 1.0, 0.0      # Rotary's (1, 0) past rope_dim
            for rotary in (False, True):
                pieces = Pieces.for_cache(ctx, 3, num_kv, device, tokens=128) if split else None
                got = decode_attention(q, k, v, positions, slots, *[t.clone() for t in views],
                                       *((cos_s, sin_s) if rotary else (None, None)), spec, pieces)
                if pieces is not None and bool(pieces.counters.any()):
                    raise AssertionError("the merging programs left their counts set")
                q_ref, k_ref = ((apply_rotary(q, cos_s, sin_s, spec.rope_dim), apply_rotary(k, cos_s, sin_s, spec.rope_dim))
                                if rotary else (q, k))
                ref_base = base.clone()
                ref = reference_attention(q_ref, k_ref, v, positions, slots,
                                          *[ref_base[:, :, i].permute(0, 2, 1, 3) for i in range(2)], spec)
                worst = max(worst, (got.float() - ref.float()).abs().max().item())
        tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
        if worst > tol:
            log.warning("Triton decode attention differs from the reference (max %.3g): not used", worst)
            return False
        return True
    except Exception:  # a Triton or driver that cannot build it: the torch ops serve
        log.warning("Triton decode attention unavailable here; using torch ops", exc_info=True)
        return False
