"""llama.cpp's quantized dot products, in the order its x86 kernels sum them.

Why bit-exact and not just "the same rounding of activations": llama.cpp's
output is chaotic in the last bit. Each quantized matmul rounds its input to 8
bits, so a one-ulp change anywhere moves some value across a rounding boundary,
which changes an output by ~1e-3, which flips many more roundings in the next
layer. Measured on SmolLM2-135M Q4_1 with the activation rounding emulated but
float32 matmuls in torch's order: moving every attn_norm weight by one ulp
changed the logits by 0.19 on average (the plain float32 model: by 1e-5), as
much as our logits differed from llama.cpp's. Only the same sums in the same
order give the same tokens.

What ggml_vec_dot_q4_1_q8_1 and ggml_vec_dot_q8_0_q8_0 do (AVX2 + AVX512-VNNI
build, read from the disassembly of libggml-cpu.so 0.3.36; llamafile's
tinyBLAS Q8_0 kernel sums the same way):
  per block b: 8 int32 lanes, lane i = sum of weight*activation over elements
  4i..4i+3 (vpdpbusd); d = f32(d_w * d_a); acc[i] = fma(d, lane_i, acc[i]);
  Q4_1 also: summs = fma(m_w, s_a, summs);
  then ((acc[0:4] + acc[4:8]) pairs (0+2, 1+3), then their sum) + summs.
fma is emulated in float64 (exact product, one rounding; a double rounding
differs from a true fma with probability ~2^-29 per step).
"""
from __future__ import annotations

import torch

LANES, LANE_WIDTH = 8, 4
_MAX_CHUNK_ELEMS = 1 << 22    # float64 lane values held at once per chunk of rows (32 MiB)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fma(a, b, c) for float32 inputs, through float64."""
    return torch.addcmul(c.double(), a.double(), b.double()).float()


def _hsum8(acc: torch.Tensor) -> torch.Tensor:
    """hsum_float_8 over the leading lane axis [8, ...] -> [...]."""
    quad = acc[4:] + acc[:4]
    pair = quad[:2] + quad[2:]
    return pair[0] + pair[1]


def block_dot(qa: torch.Tensor, da: torch.Tensor, qw: torch.Tensor, dw: torch.Tensor,
              mins: torch.Tensor | None = None, sa: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of quantized activations times rows of a quantized weight, as llama.cpp sums.

    qa [T, nb, 32] integer-valued float32, da [T, nb] float32 (fp16 values);
    qw [R, nb, 32] integers (any dtype), dw [R, nb] float32 (fp16 values);
    Q4_1 weights: mins [R, nb] and the activations' fp16 block sums sa [T, nb].
    Returns [T, R] float32."""
    t, nb, _ = qa.shape
    r = qw.shape[0]
    rows = max(1, _MAX_CHUNK_ELEMS // max(1, r * nb * LANES))
    if t > rows:
        return torch.cat([block_dot(qa[i:i + rows], da[i:i + rows], qw, dw, mins,
                                    None if sa is None else sa[i:i + rows])
                          for i in range(0, t, rows)])
    groups = nb * LANES
    # Integer lane sums, exact in float32 (|sum| <= 4 * 255 * 127): [G, T, R] -> [nb, 8, T, R].
    lanes = torch.bmm(qa.reshape(t, groups, LANE_WIDTH).transpose(0, 1),
                      qw.float().reshape(r, groups, LANE_WIDTH).permute(1, 2, 0))
    lanes = lanes.reshape(nb, LANES, t, r)
    scale = (da.T.unsqueeze(-1) * dw.T.unsqueeze(1))                # [nb, T, R]: f32(d_a * d_w)
    acc = torch.zeros(LANES, t, r)
    for b in range(nb):
        # per block, not all at once: a float64 copy of every lane was 4x slower
        acc = _fma(scale[b], lanes[b], acc)
    out = _hsum8(acc)
    if mins is None:
        return out
    summs = torch.zeros(t, r)
    for b in range(nb):
        summs = _fma(sa[:, b:b + 1], mins[:, b], summs)
    return out + summs
