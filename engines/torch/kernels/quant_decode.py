"""Triton decoders of GGUF blocks, one per ggml type, shared by the quantized
matrix-vector kernel and the dequantize kernel of `quant_ops`.

A kernel walks a weight in chunks of 256 weights (one K-quant super-block, or
eight legacy blocks of 32) and sees each chunk as a tile [BN rows, S, L]: S
sub-blocks of L weights in the natural weight order, sub-block z holding
weights z*L .. z*L+L-1 of the chunk. A decoder returns for its rows

    q      [BN, S, L] float32  the integer quants (bias such as -8 or -32 applied)
    scale  [BN, S]    float32  the sub-block's scale
    offset [BN, S]    float32  what the sub-block adds to every weight (-dmin*m)

so that weight = q * scale + offset, exactly as gguf-py's dequantize computes it
(float32 products of an fp16 scale and a small integer are exact). The matvec
kernel never forms the weight: it sums q*x per sub-block, then scales once.

A tile may hold several chunks side by side (T = chunks * S sub-blocks): `h3`
[1, T, 1] and `h2` [1, T] give each sub-block's chunk and `z3`/`z2` its place in
that chunk (scalars and [1, S, ...] tiles work the same for one chunk).
Planes come in `quant_weight.PLANES` order: `b*` are [BN, 1, 1] pointer tiles
at each row's start (for per-weight fields), `c*` the same as [BN, 1] (per
sub-block fields). Where the decoder reads the same byte twice (the low and
high nibble land in different sub-blocks of the tile) the second read hits L1:
DRAM traffic is each byte once.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch ship without Triton; quant_ops serves the torch path
    triton = None

# ggml type -> (kernel type id, S, L)
TILES: dict[str, tuple[int, int, int]] = {
    "Q8_0": (0, 8, 32), "Q4_0": (1, 8, 32), "Q4_1": (2, 8, 32), "Q5_0": (3, 8, 32), "Q5_1": (4, 8, 32),
    "Q2_K": (5, 16, 16), "Q3_K": (6, 16, 16), "Q4_K": (7, 8, 32), "Q5_K": (8, 8, 32), "Q6_K": (9, 16, 16),
}
CHUNK = 256  # weights per chunk: S * L for every type

if triton is not None:
    @triton.jit
    def _f32(v):
        return v.to(tl.float32)

    @triton.jit
    def _quants(u, bias: tl.constexpr):
        """Per-weight quants u (int32, 0 <= u < 2^23) minus `bias`, as float32, without I2F:
        the bits of u under the exponent of 2^23 are the float 2^23 + u, and one exact FADD
        takes 2^23 + bias off. I2F runs at a quarter of the FP32 rate on Hopper and was one
        instruction a weight (sm_90 SASS of the Q4_K matvec)."""
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + bias)

    @triton.jit
    def _q8_0(b0, c0, c1, h3, h2, z3, j3, z2, m3, m2):
        blk3, blk2 = h3 * 8 + z3, h2 * 8 + z2
        q = _f32(tl.load(b0 + blk3 * 32 + j3, mask=m3, other=0))
        d = _f32(tl.load(c1 + blk2, mask=m2, other=0.0))
        return q, d, d * 0.0

    @triton.jit
    def _low_nibbles32(b0, blk3, j3, m3):
        # legacy 4-bit blocks: byte j holds weight j (low nibble) and j + 16 (high)
        byte = tl.load(b0 + blk3 * 16 + (j3 % 16), mask=m3, other=0).to(tl.int32)
        return (byte >> ((j3 // 16) * 4)) & 15

    @triton.jit
    def _q4_0(b0, c0, c1, h3, h2, z3, j3, z2, m3, m2):
        q = _quants(_low_nibbles32(b0, h3 * 8 + z3, j3, m3), 8)
        d = _f32(tl.load(c1 + h2 * 8 + z2, mask=m2, other=0.0))
        return q, d, d * 0.0

    @triton.jit
    def _q4_1(b0, c0, c1, h3, h2, z3, j3, z2, m3, m2):
        q = _quants(_low_nibbles32(b0, h3 * 8 + z3, j3, m3), 0)
        blk2 = h2 * 8 + z2
        d = _f32(tl.load(c1 + blk2 * 2, mask=m2, other=0.0))
        m = _f32(tl.load(c1 + blk2 * 2 + 1, mask=m2, other=0.0))
        return q, d, m

    @triton.jit
    def _fifth_bit(b2, blk3, j3, m3):
        # qh: one little-endian uint32 per block, bit j for weight j
        qh = tl.load(b2 + blk3, mask=m3, other=0)
        return ((qh >> j3) & 1) << 4

    @triton.jit
    def _q5_0(b0, b2, c0, c1, h3, h2, z3, j3, z2, m3, m2):
        blk3 = h3 * 8 + z3
        q = _quants(_low_nibbles32(b0, blk3, j3, m3) | _fifth_bit(b2, blk3, j3, m3), 16)
        d = _f32(tl.load(c1 + h2 * 8 + z2, mask=m2, other=0.0))
        return q, d, d * 0.0

    @triton.jit
    def _q5_1(b0, b2, c0, c1, h3, h2, z3, j3, z2, m3, m2):
        blk3, blk2 = h3 * 8 + z3, h2 * 8 + z2
        q = _quants(_low_nibbles32(b0, blk3, j3, m3) | _fifth_bit(b2, blk3, j3, m3), 0)
        d = _f32(tl.load(c1 + blk2 * 2, mask=m2, other=0.0))
        m = _f32(tl.load(c1 + blk2 * 2 + 1, mask=m2, other=0.0))
        return q, d, m

    @triton.jit
    def _two_bits(b0, h3, z3, j3):
        # Q2_K/Q3_K: weight 128h + 32s + l is bits 2s of byte 32h + l; here z = 8h + 2s + l // 16
        byte = tl.load(b0 + h3 * 64 + (z3 // 8) * 32 + (z3 % 2) * 16 + j3).to(tl.int32)
        return (byte >> (((z3 % 8) // 2) * 2)) & 3

    @triton.jit
    def _q2_k(b0, c1, c2, h3, h2, z3, j3, z2):
        q = _quants(_two_bits(b0, h3, z3, j3), 0)
        sc = tl.load(c1 + h2 * 16 + z2).to(tl.int32)
        d = _f32(tl.load(c2 + h2 * 2))
        dmin = _f32(tl.load(c2 + h2 * 2 + 1))
        return q, d * _f32(sc & 15), -dmin * _f32(sc >> 4)

    @triton.jit
    def _q3_k(b0, b1, c2, c3, h3, h2, z3, j3, z2):
        # hmask: weight 32i + l is bit i of byte l; a clear bit subtracts 4
        hm = tl.load(b1 + h3 * 32 + (z3 % 2) * 16 + j3).to(tl.int32)
        q = _quants(_two_bits(b0, h3, z3, j3) | (((hm >> (z3 // 2)) & 1) << 2), 4)
        sb = c2 + h2 * 12
        low = (tl.load(sb + z2 % 8).to(tl.int32) >> ((z2 // 8) * 4)) & 15
        high = (tl.load(sb + 8 + z2 % 4).to(tl.int32) >> ((z2 // 4) * 2)) & 3
        d = _f32(tl.load(c3 + h2))
        return q, d * _f32((low | (high << 4)) - 32), d * 0.0

    @triton.jit
    def _k_scales(c1, c2, h2, z2):
        """Q4_K/Q5_K: 8 six-bit scales and mins packed in 12 bytes, and fp16 d, dmin."""
        sb = c2 + h2 * 12
        lo = z2 < 4
        a = tl.load(sb + tl.where(lo, z2, z2 + 4)).to(tl.int32)
        b = tl.load(sb + tl.where(lo, z2 + 4, z2 - 4)).to(tl.int32)
        e = tl.load(sb + z2).to(tl.int32)
        sc = tl.where(lo, a & 63, (a & 15) | ((b >> 6) << 4))
        m = tl.where(lo, b & 63, (a >> 4) | ((e >> 6) << 4))
        d = _f32(tl.load(c1 + h2 * 2))
        dmin = _f32(tl.load(c1 + h2 * 2 + 1))
        return d * _f32(sc), -dmin * _f32(m)

    @triton.jit
    def _nibbles64(b0, h3, z3, j3):
        # Q4_K/Q5_K: byte 32g + j holds weight 64g + j (low nibble) and 64g + 32 + j (high)
        byte = tl.load(b0 + h3 * 128 + (z3 // 2) * 32 + j3).to(tl.int32)
        return (byte >> ((z3 % 2) * 4)) & 15

    @triton.jit
    def _q4_k(b0, c1, c2, h3, h2, z3, j3, z2):
        scale, offset = _k_scales(c1, c2, h2, z2)
        return _quants(_nibbles64(b0, h3, z3, j3), 0), scale, offset

    @triton.jit
    def _q5_k(b0, b3, c1, c2, h3, h2, z3, j3, z2):
        scale, offset = _k_scales(c1, c2, h2, z2)
        qh = tl.load(b3 + h3 * 32 + j3).to(tl.int32)  # weight 32i + l: bit i of byte l
        return _quants(_nibbles64(b0, h3, z3, j3) | (((qh >> z3) & 1) << 4), 0), scale, offset

    @triton.jit
    def _q6_k(b0, b1, c2, c3, h3, h2, z3, j3, z2):
        # weight 128h + 64t + cc: nibble t of ql byte 64h + cc; bits 2(2t + cc//32) of qh byte 32h + cc % 32
        h, zz = z3 // 8, z3 % 8
        ql = tl.load(b0 + h3 * 128 + h * 64 + (zz % 4) * 16 + j3).to(tl.int32)
        qh = tl.load(b1 + h3 * 64 + h * 32 + (zz % 2) * 16 + j3).to(tl.int32)
        q = ((ql >> ((zz // 4) * 4)) & 15) | (((qh >> ((zz // 2) * 2)) & 3) << 4)
        d = _f32(tl.load(c3 + h2))
        sc = _f32(tl.load(c2 + h2 * 16 + z2))
        return _quants(q, 32), d * sc, d * sc * 0.0

    @triton.jit
    def decode_chunk(TYPE: tl.constexpr, b0, b1, b2, b3, c0, c1, c2, c3, h3, h2, z3, j3, z2, m3, m2):
        """Chunks h of each row -> (q [BN,T,L], scale [BN,T], offset [BN,T]); m3/m2 mask a ragged tail
        (legacy types only: K-quant rows are whole chunks)."""
        if TYPE == 0:
            q, scale, offset = _q8_0(b0, c0, c1, h3, h2, z3, j3, z2, m3, m2)
        elif TYPE == 1:
            q, scale, offset = _q4_0(b0, c0, c1, h3, h2, z3, j3, z2, m3, m2)
        elif TYPE == 2:
            q, scale, offset = _q4_1(b0, c0, c1, h3, h2, z3, j3, z2, m3, m2)
        elif TYPE == 3:
            q, scale, offset = _q5_0(b0, b2, c0, c1, h3, h2, z3, j3, z2, m3, m2)
        elif TYPE == 4:
            q, scale, offset = _q5_1(b0, b2, c0, c1, h3, h2, z3, j3, z2, m3, m2)
        elif TYPE == 5:
            q, scale, offset = _q2_k(b0, c1, c2, h3, h2, z3, j3, z2)
        elif TYPE == 6:
            q, scale, offset = _q3_k(b0, b1, c2, c3, h3, h2, z3, j3, z2)
        elif TYPE == 7:
            q, scale, offset = _q4_k(b0, c1, c2, h3, h2, z3, j3, z2)
        elif TYPE == 8:
            q, scale, offset = _q5_k(b0, b3, c1, c2, h3, h2, z3, j3, z2)
        else:
            q, scale, offset = _q6_k(b0, b1, c2, c3, h3, h2, z3, j3, z2)
        return q, scale, offset


# Pair decoders: the same blocks seen as [BN, S2, L2] bytes, each byte read once and both
# of its nibbles used (the generic tile reads a byte once per nibble and extracts it
# twice: ~12 SASS instructions a weight on sm_90 against ~7 here). They return two parts
# (a: low nibbles, b: high), each with its scale, offset and the chunk-relative weight
# index of its tile, for the M=1 matvec. Types without a pair decoder use decode_chunk.
PAIR_TILES: dict[str, tuple[int, int]] = {
    "Q4_0": (8, 16), "Q4_1": (8, 16), "Q5_0": (8, 16), "Q5_1": (8, 16),
    "Q4_K": (4, 32), "Q5_K": (4, 32), "Q6_K": (8, 16),
}

if triton is not None:
    @triton.jit
    def _legacy_pair(TYPE: tl.constexpr, b0, b1, b2, h3, z3, j3, m3):
        # block h*8 + z: byte j holds weight j (low nibble) and j + 16 (high); qh bit j, j + 16
        blk = h3 * 8 + z3
        byte = tl.load(b0 + blk * 16 + j3, mask=m3, other=0).to(tl.int32)
        lo, hi = byte & 15, byte >> 4
        if TYPE == 3 or TYPE == 4:
            qh = tl.load(b2 + blk, mask=m3, other=0)
            lo = lo | (((qh >> j3) & 1) << 4)
            hi = hi | (((qh >> (j3 + 16)) & 1) << 4)
        if TYPE == 1 or TYPE == 3:
            d = _f32(tl.load(b1 + blk, mask=m3, other=0.0))
            off = d * 0.0
        else:
            d = _f32(tl.load(b1 + blk * 2, mask=m3, other=0.0))
            off = _f32(tl.load(b1 + blk * 2 + 1, mask=m3, other=0.0))
        if TYPE == 1:
            qa, qb = _quants(lo, 8), _quants(hi, 8)
        elif TYPE == 3:
            qa, qb = _quants(lo, 16), _quants(hi, 16)
        else:
            qa, qb = _quants(lo, 0), _quants(hi, 0)
        xa = z3 * 32 + j3
        return qa, d, off, xa, qb, d, off, xa + 16

    @triton.jit
    def _k_pair(TYPE: tl.constexpr, b0, b1, b2, b3, h3, z3, j3):
        # group g = z: byte 32g + j holds weight 64g + j (sub-block 2g) and 64g + 32 + j (2g + 1)
        byte = tl.load(b0 + h3 * 128 + z3 * 32 + j3).to(tl.int32)
        lo, hi = byte & 15, byte >> 4
        if TYPE == 8:
            qh = tl.load(b3 + h3 * 32 + j3).to(tl.int32)   # weight 32i + l: bit i of byte l
            lo = lo | (((qh >> (2 * z3)) & 1) << 4)
            hi = hi | (((qh >> (2 * z3 + 1)) & 1) << 4)
        sa, oa = _k_scales(b1, b2, h3, 2 * z3)
        sb, ob = _k_scales(b1, b2, h3, 2 * z3 + 1)
        xa = z3 * 64 + j3
        return _quants(lo, 0), sa, oa, xa, _quants(hi, 0), sb, ob, xa + 32

    @triton.jit
    def _q6_k_pair(b0, b1, b2, b3, h3, z3, j3):
        # u = z = 4h + cq: ql byte 64h + 16cq + j holds weight 128h + 16cq + j (low nibble)
        # and that + 64 (high); their 2 high bits sit in qh byte 32h + 16(cq % 2) + j
        h, cq = z3 // 4, z3 % 4
        ql = tl.load(b0 + h3 * 128 + h * 64 + cq * 16 + j3).to(tl.int32)
        qh = tl.load(b1 + h3 * 64 + h * 32 + (cq % 2) * 16 + j3).to(tl.int32)
        lo = (ql & 15) | (((qh >> (2 * (cq // 2))) & 3) << 4)
        hi = (ql >> 4) | (((qh >> (2 * (cq // 2) + 4)) & 3) << 4)
        d = _f32(tl.load(b3 + h3))
        sa = d * _f32(tl.load(b2 + h3 * 16 + h * 8 + cq))
        sb = d * _f32(tl.load(b2 + h3 * 16 + h * 8 + 4 + cq))
        xa = h * 128 + cq * 16 + j3
        return _quants(lo, 32), sa, sa * 0.0, xa, _quants(hi, 32), sb, sb * 0.0, xa + 64

    @triton.jit
    def decode_pair(TYPE: tl.constexpr, b0, b1, b2, b3, h3, z3, j3, m3):
        """[BN, S2, L2] bytes of chunks h3 -> (qa, scale_a, offset_a, xa, qb, scale_b, offset_b, xb):
        q [BN, S2, L2] float32, scales and offsets [BN, S2, 1], x indexes [1, S2, L2] within the chunk."""
        if TYPE == 7 or TYPE == 8:
            qa, sa, oa, xa, qb, sb, ob, xb = _k_pair(TYPE, b0, b1, b2, b3, h3, z3, j3)
        elif TYPE == 9:
            qa, sa, oa, xa, qb, sb, ob, xb = _q6_k_pair(b0, b1, b2, b3, h3, z3, j3)
        else:
            qa, sa, oa, xa, qb, sb, ob, xb = _legacy_pair(TYPE, b0, b1, b2, h3, z3, j3, m3)
        return qa, sa, oa, xa, qb, sb, ob, xb
