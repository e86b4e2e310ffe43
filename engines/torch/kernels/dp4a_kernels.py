"""The Triton kernels of the integer-dot matvec (`quant_dp4a` launches them and says why).

Every kernel computes y[m, n] = W[n, :] . x[m, :] for M <= 8 rows of x, each row
already quantized to int8 in blocks of 32 (ggml's q8_1: `xw` its int8 read as int32
words, `dx` the scale of each block of 32, `sx` = dx * the block's sum of quants,
`s16` the sum of quants of each 16). A program owns BN weight rows and all BM rows
of x, and walks K in steps; a step is a tile [BM, BN, G, 4] of int32 words: G
"slots" per weight row, each one thread's 16-byte vectors (the last axis stays in
one thread, so its integer sums need no shuffle), the weight words loaded once for
every row of x. Per-slot scales are [1, BN, G, 1] tiles of the same layout; the
accumulator is elementwise, reduced once after the loop. At one row of x the loop
has no barrier and no shuffle (sm_90 SASS: ~0.07 warp-instructions a weight for
Q4_K, against ~0.3 for the float matvec).

Loads past the last block are clamped, not masked, so they stay vectorized; x's
loads there are masked to 0, which zeroes their products. Rows of x past M repeat
row M - 1 and are not stored.
"""
from __future__ import annotations

from engines.torch.kernels.gated_input import load_x
from engines.torch.kernels.normed_input import load_normed, row_rstd
from engines.torch.kernels.pdl import pdl_start, pdl_wait
from engines.torch.kernels.quant_decode import triton

if triton is not None:
    import triton.language as tl

    NIBBLES = tl.constexpr(0x0F0F0F0F)

    @triton.jit
    def _dp4a(a, b, c, EMULATE: tl.constexpr):
        """c + the dot product of the four signed bytes of a and of b (sm_61+ `dp4a`)."""
        if EMULATE:      # Triton's interpreter runs no PTX
            acc = c
            for i in tl.static_range(4):
                acc += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
            return acc
        else:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _dot(q0, x0, EMULATE: tl.constexpr):
        """Sum over a slot's words of dp4a(q0, x0): [1, BN, G, 4] x [BM, 1, G, 4] -> [BM, BN, G, 1]."""
        q0, x0 = tl.broadcast(q0, x0)
        return tl.sum(_dp4a(q0, x0, tl.zeros_like(q0), EMULATE), axis=3, keep_dims=True).to(tl.float32)

    @triton.jit
    def _dot2(q0, x0, q1, x1, EMULATE: tl.constexpr):
        """_dot of two pairs, chained on dp4a's accumulator."""
        q0, x0 = tl.broadcast(q0, x0)
        q1, x1 = tl.broadcast(q1, x1)
        both = _dp4a(q1, x1, _dp4a(q0, x0, tl.zeros_like(q0), EMULATE), EMULATE)
        return tl.sum(both, axis=3, keep_dims=True).to(tl.float32)

    @triton.jit
    def _half(word, HIGH: tl.constexpr):
        """The low or high fp16 of an int32 word, as float32."""
        if HIGH:
            word = word >> 16
        return (word & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _signed_byte(word, BYTE: tl.constexpr):
        return ((word << (24 - 8 * BYTE)) >> 24).to(tl.float32)

    @triton.jit
    def _tiles(M, N, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, ids_ptr, x_div,
               INDEXED: tl.constexpr):
        """This program's weight rows (and clamped [1, BN, 1, 1]), x rows [BM, 1, 1, 1], slots, words.
        INDEXED (stacked experts, quant_experts.py): program axis 1 is a (token, expert) pair,
        its weight rows offset by its expert's first row, its x row pair // x_div (BM = 1)."""
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        r = tl.minimum(rows, N - 1)[None, :, None, None].to(tl.int64)
        m = tl.minimum(tl.arange(0, BM), M - 1)[:, None, None, None]
        if INDEXED:
            pair = tl.program_id(1)
            r += tl.load(ids_ptr + pair).to(tl.int64) * N
            m = m * 0 + pair // x_div
        return rows, r, m, tl.arange(0, G)[None, None, :, None], tl.arange(0, 4)[None, None, None, :]

    @triton.jit
    def _pair_out(out_ptr, s_om, INDEXED: tl.constexpr):
        """Where this program's output row starts: the pair's row where INDEXED."""
        if INDEXED:
            out_ptr += tl.program_id(1).to(tl.int64) * s_om
        return out_ptr

    @triton.jit
    def _step(NB, h0, UNITS: tl.constexpr, slot):
        """A step's block per slot (clamped), the slot's place in it, and whether it is in the row."""
        h = h0 + slot // UNITS
        return tl.minimum(h, NB - 1), slot % UNITS, h < NB

    @triton.jit
    def _store(out_ptr, acc, rows, M, N, s_om, BM: tl.constexpr):
        y = tl.sum(tl.sum(acc, axis=3), axis=2)                                    # [BM, BN]
        mo = tl.arange(0, BM)[:, None]
        tl.store(out_ptr + mo * s_om + rows[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=(mo < M) & (rows[None, :] < N))

    @triton.jit(do_not_specialize=["M", "N", "NB", "s_om", "x_div"])
    def q4_k_kernel(out_ptr, qw_ptr, dm_ptr, sc_ptr, s_qw, s_dm, s_sc, xw_ptr, dx_ptr, sx_ptr, s16_ptr,
                    M, N, NB, s_om, BM: tl.constexpr, BN: tl.constexpr, SB: tl.constexpr,
                    UNROLL: tl.constexpr, EMULATE: tl.constexpr,
                    ids_ptr=None, x_div=1, INDEXED: tl.constexpr = False,
                    USE_PDL: tl.constexpr = False):
        """Q4_K: a slot is a 32-byte group g of a super-block: low nibbles are sub-block 2g,
        high nibbles 2g + 1; d * scale * dx * dot - dmin * min * sx per sub-block."""
        pdl_start(USE_PDL)
        pdl_wait(USE_PDL)     # pdl.py: x's quants are the kernel before's (never with INDEXED)
        rows, r, m, slot, w4 = _tiles(M, N, BM, BN, SB * 4, ids_ptr, x_div, INDEXED)
        xrow, drow = xw_ptr + m * (NB * 64), m * (NB * 8)
        acc = tl.zeros([BM, BN, SB * 4, 1], dtype=tl.float32)
        for h0 in range(0, NB, SB * UNROLL):
            for u in tl.static_range(UNROLL):
                h, g, live = _step(NB, h0 + u * SB, 4, slot)
                qp = qw_ptr + r * s_qw + h * 32 + g * 8
                qa, qb = tl.load(qp + w4), tl.load(qp + 4 + w4)
                xp = xrow + h * 64 + g * 16 + w4
                dot_lo = _dot2(qa & NIBBLES, tl.load(xp, mask=live, other=0),
                               qb & NIBBLES, tl.load(xp + 4, mask=live, other=0), EMULATE)
                dot_hi = _dot2((qa >> 4) & NIBBLES, tl.load(xp + 8, mask=live, other=0),
                               (qb >> 4) & NIBBLES, tl.load(xp + 12, mask=live, other=0), EMULATE)
                # ggml's get_scale_min_k4 on the 12 scale bytes read as three words
                sp = sc_ptr + r * s_sc + h * 3
                shift = (g % 2) * 16
                a, b, c = tl.load(sp) >> shift, tl.load(sp + 1) >> shift, tl.load(sp + 2) >> shift
                low = g < 2
                sc_lo = tl.where(low, a & 63, (c & 15) | ((a >> 2) & 48)).to(tl.float32)
                m_lo = tl.where(low, b & 63, ((c >> 4) & 15) | ((b >> 2) & 48)).to(tl.float32)
                sc_hi = tl.where(low, (a >> 8) & 63, ((c >> 8) & 15) | ((a >> 10) & 48)).to(tl.float32)
                m_hi = tl.where(low, (b >> 8) & 63, ((c >> 12) & 15) | ((b >> 10) & 48)).to(tl.float32)
                dm = tl.load(dm_ptr + r * s_dm + h)
                d, dmin = _half(dm, False), _half(dm, True)
                sub = drow + h * 8 + 2 * g
                dx_lo = tl.load(dx_ptr + sub, mask=live, other=0.0)
                dx_hi = tl.load(dx_ptr + sub + 1, mask=live, other=0.0)
                sx_lo = tl.load(sx_ptr + sub, mask=live, other=0.0)
                sx_hi = tl.load(sx_ptr + sub + 1, mask=live, other=0.0)
                acc += (d * sc_lo * dx_lo * dot_lo + d * sc_hi * dx_hi * dot_hi
                        - dmin * (m_lo * sx_lo + m_hi * sx_hi))
        _store(_pair_out(out_ptr, s_om, INDEXED), acc, rows, M, N, s_om, BM)

    @triton.jit
    def _q6(ql, qh, SHIFT_L: tl.constexpr, shift_h):
        """Four 6-bit quants a word (0..63, bias 32 left to the caller): 4 bits of ql, 2 of qh."""
        return ((ql >> SHIFT_L) & NIBBLES) | (((qh >> shift_h) & 0x03030303) << 4)

    @triton.jit
    def _q6_sub(q, xp, s16p, live, sc, EMULATE: tl.constexpr):
        """scale * (dot - 32 * sum of x's quants) of one sub-block of 16."""
        s = tl.load(s16p, mask=live, other=0).to(tl.float32)
        return sc * (_dot(q, tl.load(xp, mask=live, other=0), EMULATE) - 32.0 * s)

    @triton.jit(do_not_specialize=["M", "N", "NB", "s_om", "x_div"])
    def q6_k_kernel(out_ptr, ql_ptr, qh_ptr, sc_ptr, d_ptr, s_ql, s_qh, s_sc, s_d, xw_ptr, dx_ptr, sx_ptr, s16_ptr,
                    M, N, NB, s_om, BM: tl.constexpr, BN: tl.constexpr, SB: tl.constexpr,
                    UNROLL: tl.constexpr, EMULATE: tl.constexpr,
                    ids_ptr=None, x_div=1, INDEXED: tl.constexpr = False,
                    USE_PDL: tl.constexpr = False):
        """Q6_K: a slot is 8 words of ql (half `part` of the super-block, quarter t < 2): their
        low nibbles are weights 128 part + 32t + 0..31 (sub-blocks of 16: 8 part + 2t, + 1),
        their high nibbles the same + 64 (sub-blocks + 4, + 5); the 2 high bits sit in qh
        words 8 part + 0..7 at bits 2t (low) and 2t + 4 (high)."""
        pdl_start(USE_PDL)
        pdl_wait(USE_PDL)     # pdl.py: x's quants are the kernel before's (never with INDEXED)
        rows, r, m, slot, w4 = _tiles(M, N, BM, BN, SB * 4, ids_ptr, x_div, INDEXED)
        xrow, drow, srow = xw_ptr + m * (NB * 64), m * (NB * 8), s16_ptr + m * (NB * 16)
        acc = tl.zeros([BM, BN, SB * 4, 1], dtype=tl.float32)
        for h0 in range(0, NB, SB * UNROLL):
            for u in tl.static_range(UNROLL):
                h, quarter, live = _step(NB, h0 + u * SB, 4, slot)
                part, t = quarter // 2, quarter % 2
                lp = ql_ptr + r * s_ql + h * 32 + part * 16 + t * 8 + w4
                hp = qh_ptr + r * s_qh + h * 16 + part * 8 + w4
                la, lb, ha, hb = tl.load(lp), tl.load(lp + 4), tl.load(hp), tl.load(hp + 4)
                sp = sc_ptr + r * s_sc + h * 4 + part * 2
                sa, sb = tl.load(sp) >> (t * 16), tl.load(sp + 1) >> (t * 16)
                xp = xrow + h * 64 + part * 32 + t * 8 + w4
                s16p = srow + h * 16 + part * 8 + 2 * t          # the slot's first sub-block of 16
                lo = (_q6_sub(_q6(la, ha, 0, 2 * t), xp, s16p, live, _signed_byte(sa, 0), EMULATE)
                      + _q6_sub(_q6(lb, hb, 0, 2 * t), xp + 4, s16p + 1, live, _signed_byte(sa, 1), EMULATE))
                hi = (_q6_sub(_q6(la, ha, 4, 2 * t + 4), xp + 16, s16p + 4, live, _signed_byte(sb, 0), EMULATE)
                      + _q6_sub(_q6(lb, hb, 4, 2 * t + 4), xp + 20, s16p + 5, live, _signed_byte(sb, 1), EMULATE))
                block = drow + h * 8 + part * 4 + t                # x's block of 32 of the low nibbles
                dx_lo = tl.load(dx_ptr + block, mask=live, other=0.0)
                dx_hi = tl.load(dx_ptr + block + 2, mask=live, other=0.0)
                acc += tl.load(d_ptr + r * s_d + h).to(tl.float32) * (dx_lo * lo + dx_hi * hi)
        _store(_pair_out(out_ptr, s_om, INDEXED), acc, rows, M, N, s_om, BM)

    @triton.jit(do_not_specialize=["M", "N", "NB", "s_om", "x_div"])
    def q4_0_kernel(out_ptr, qw_ptr, d_ptr, s_qw, s_d, xw_ptr, dx_ptr, sx_ptr, s16_ptr,
                    M, N, NB, s_om, BM: tl.constexpr, BN: tl.constexpr, SB: tl.constexpr,
                    UNROLL: tl.constexpr, EMULATE: tl.constexpr,
                    ids_ptr=None, x_div=1, INDEXED: tl.constexpr = False,
                    USE_PDL: tl.constexpr = False):
        """Q4_0: a slot is one block of 32 (4 words): low nibbles weights 0..15, high 16..31,
        value (q - 8) * d: d * (dx * dot - 8 * sx)."""
        pdl_start(USE_PDL)
        pdl_wait(USE_PDL)     # pdl.py: x's quants are the kernel before's (never with INDEXED)
        rows, r, m, slot, w4 = _tiles(M, N, BM, BN, SB, ids_ptr, x_div, INDEXED)
        xrow, drow = xw_ptr + m * (NB * 8), m * NB
        acc = tl.zeros([BM, BN, SB, 1], dtype=tl.float32)
        for h0 in range(0, NB, SB * UNROLL):
            for u in tl.static_range(UNROLL):
                b, _, live = _step(NB, h0 + u * SB, 1, slot)
                q = tl.load(qw_ptr + r * s_qw + b * 4 + w4)
                xp = xrow + b * 8 + w4
                dot = _dot2(q & NIBBLES, tl.load(xp, mask=live, other=0),
                            (q >> 4) & NIBBLES, tl.load(xp + 4, mask=live, other=0), EMULATE)
                dx = tl.load(dx_ptr + drow + b, mask=live, other=0.0)
                sx = tl.load(sx_ptr + drow + b, mask=live, other=0.0)
                acc += tl.load(d_ptr + r * s_d + b).to(tl.float32) * (dx * dot - 8.0 * sx)
        _store(_pair_out(out_ptr, s_om, INDEXED), acc, rows, M, N, s_om, BM)

    @triton.jit(do_not_specialize=["M", "N", "NB", "s_om", "x_div"])
    def q8_0_kernel(out_ptr, qw_ptr, d_ptr, s_qw, s_d, xw_ptr, dx_ptr, sx_ptr, s16_ptr,
                    M, N, NB, s_om, BM: tl.constexpr, BN: tl.constexpr, SB: tl.constexpr,
                    UNROLL: tl.constexpr, EMULATE: tl.constexpr,
                    ids_ptr=None, x_div=1, INDEXED: tl.constexpr = False,
                    USE_PDL: tl.constexpr = False):
        """Q8_0: a slot is one block of 32 signed bytes (8 words): d * dx * dot."""
        pdl_start(USE_PDL)
        pdl_wait(USE_PDL)     # pdl.py: x's quants are the kernel before's (never with INDEXED)
        rows, r, m, slot, w4 = _tiles(M, N, BM, BN, SB, ids_ptr, x_div, INDEXED)
        xrow, drow = xw_ptr + m * (NB * 8), m * NB
        acc = tl.zeros([BM, BN, SB, 1], dtype=tl.float32)
        for h0 in range(0, NB, SB * UNROLL):
            for u in tl.static_range(UNROLL):
                b, _, live = _step(NB, h0 + u * SB, 1, slot)
                qp = qw_ptr + r * s_qw + b * 8 + w4
                xp = xrow + b * 8 + w4
                dot = _dot2(tl.load(qp), tl.load(xp, mask=live, other=0),
                            tl.load(qp + 4), tl.load(xp + 4, mask=live, other=0), EMULATE)
                dx = tl.load(dx_ptr + drow + b, mask=live, other=0.0)
                acc += tl.load(d_ptr + r * s_d + b).to(tl.float32) * dx * dot
        _store(_pair_out(out_ptr, s_om, INDEXED), acc, rows, M, N, s_om, BM)

    @triton.jit
    def _round_half_away(v):
        """roundf, as ggml's quantize_row_q8_1 rounds (not round-half-even)."""
        return tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))

    @triton.jit(do_not_specialize=["K", "ROW"])
    def quantize_x_kernel(x_ptr, q_ptr, d_ptr, s_ptr, s16_ptr, K, ROW, BLOCKS: tl.constexpr,
                          GATE: tl.constexpr = 0, USE_PDL: tl.constexpr = False,
                          dl_ptr=None, g_ptr=None, sum_ptr=None, eps=0.0,
                          NORM: tl.constexpr = False, HAS_DELTA: tl.constexpr = False):
        """x [K] -> int8 quants, the scale and scaled sum of each 32, the quant sum of each 16.
        GATE: x is rows of ROW values read as act(gate) * up from rows of [gate | up] (2 ROW).
        NORM (normed_input.py): x is rms_norm(x + dl) * g over rows of ROW, a program's blocks
        inside one row (ROW a multiple of 32 * BLOCKS); each program writes its part of the sum."""
        pdl_start(USE_PDL)
        pdl_wait(USE_PDL)
        blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        k = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
        live = k < K
        if NORM:
            row_start = (tl.program_id(0) * BLOCKS * 32 // ROW) * ROW
            rstd = row_rstd(x_ptr, dl_ptr, row_start, ROW, eps, HAS_DELTA, 1024)
            _, x = load_normed(x_ptr, dl_ptr, g_ptr, sum_ptr, k, k - row_start, live, True, HAS_DELTA)
            x = x * rstd
        else:
            at = k if GATE == 0 else (k // ROW) * (2 * ROW) + k % ROW
            x = load_x(x_ptr, at, live, ROW, GATE)
        d = tl.max(tl.abs(x), axis=1) / 127.0
        inv = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
        q = _round_half_away(x * inv[:, None])
        tl.store(q_ptr + k, q.to(tl.int8), mask=live)
        whole = blk * 32 < K
        tl.store(d_ptr + blk, d, mask=whole)
        tl.store(s_ptr + blk, d * tl.sum(q, axis=1), mask=whole)
        halves = tl.sum(tl.reshape(q, (BLOCKS, 2, 16)), axis=2).to(tl.int32)        # [BLOCKS, 2]
        k16 = blk[:, None] * 2 + tl.arange(0, 2)[None, :]
        tl.store(s16_ptr + k16, halves, mask=k16 * 16 < K)
