"""The float32 primitives of llama.cpp's x86 CPU kernels, bit for bit, in torch.

engines.torch.ggml.dot says why bit for bit: llama.cpp's tokens are chaotic in
the last bit. Each function here was checked against llama.cpp 0.3.36's own
intermediate tensors (cb_eval) on SmolLM2-135M: zero difference.

- `fma`: one rounding of a*b+c (emulated through float64).
- `reduce_add16`: _mm512_reduce_add_ps (GCC's order: halves, quarters, pairs).
- `v_expf`: ggml_v_expf (AVX512), the polynomial exp of softmax and SiLU.
- `silu`: ggml_v_silu, x / (1 + v_expf(-x)).
- `rope_cos_sin`: ggml_rope_cache_init's angles (theta *= theta_scale in
  float32) through the C library's cosf/sinf: torch's float32 cos/sin, and
  float64 rounded to float32, each differed from glibc's on ~1% of the angles.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)


def fma(a: torch.Tensor | float, b: torch.Tensor | float, c: torch.Tensor | float) -> torch.Tensor:
    """float32 fma: the float64 product of two float32 values is exact; the sum is
    rounded twice (float64, then float32), which differs from one rounding with
    probability ~2^-29."""
    a, b, c = (torch.as_tensor(v, dtype=torch.float64) if not isinstance(v, torch.Tensor)
               else v.double() for v in (a, b, c))
    return torch.addcmul(c, a, b).float()


def reduce_add16(x: torch.Tensor) -> torch.Tensor:
    """[..., 16] -> [...]: the sum in _mm512_reduce_add_ps's order."""
    t8 = x[..., 8:] + x[..., :8]
    t4 = t8[..., 4:] + t8[..., :4]
    t2 = t4[..., :2] + t4[..., 2:]
    return t2[..., 0] + t2[..., 1]


def f16_dot(a: torch.Tensor, b: torch.Tensor, one_token: bool) -> torch.Tensor:
    """sum(a * b, -1) of float16 values (held as float32; broadcastable, last dim a
    multiple of 64) in the order of llama.cpp's F16 matmul kernel:
    - tinyBLAS (llamafile_sgemm, used when the batch has 2+ columns): 16 lanes,
      one fma per 16 values in order, then _mm512_reduce_add_ps;
    - ggml_vec_dot_f16 (one column: sgemm declines n < 2): 4 accumulators of 16
      lanes fed 64 values a step, folded (0+2)+(1+3), then _mm512_reduce_add_ps."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    k = a.shape[-1]
    if not one_token:
        acc = torch.zeros(*shape, 16)
        for c in range(0, k, 16):
            acc = fma(a[..., c:c + 16], b[..., c:c + 16], acc)
        return reduce_add16(acc)
    acc = torch.zeros(*shape, 4, 16)
    for c in range(0, k, 64):
        acc = fma(a[..., c:c + 64].unflatten(-1, (4, 16)), b[..., c:c + 64].unflatten(-1, (4, 16)), acc)
    return reduce_add16((acc[..., 0, :] + acc[..., 2, :]) + (acc[..., 1, :] + acc[..., 3, :]))


def _c(hex_value: str) -> float:
    return float.fromhex(hex_value)


def v_expf(x: torch.Tensor) -> torch.Tensor:
    """ggml_v_expf (AVX512) on float32 x; -inf -> 0, overflow -> inf."""
    r = _c("0x1.8p23")
    z = fma(x, _c("0x1.715476p+0"), r)
    n = z - r
    b = fma(-n, _c("0x1.7f7d1cp-20"), fma(-n, _c("0x1.62e4p-1"), x))
    u = b * b
    j = fma(fma(fma(_c("0x1.0e4020p-7"), b, _c("0x1.573e2ep-5")), u,
                fma(_c("0x1.555e66p-3"), b, _c("0x1.fffdb6p-2"))),
            u, fma(_c("0x1.ffffecp-1"), b, 1.0))
    out = torch.ldexp(j, n)
    far = n.abs() > 192                                    # also NaN-free for x = -inf
    return torch.where(far, torch.where(n <= 0, 0.0, float("inf")), out)


def silu(x: torch.Tensor) -> torch.Tensor:
    """ggml_v_silu: x / (1 + v_expf(0 - x))."""
    return x / (1.0 + v_expf(0.0 - x))


@functools.lru_cache(maxsize=1)
def _libm() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("m")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    for fn in (lib.cosf, lib.sinf):
        fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]
    return lib


def rope_angles(num_positions: int, half: int, theta_scale: float, freq_scale: float = 1.0,
                freq_factors: np.ndarray | None = None) -> np.ndarray:
    """[num_positions, half] float32: theta_i = p, then theta *= theta_scale, as
    ggml_rope_cache_init; divided by the file's frequency factors if any, times
    freq_scale (rope_yarn without extrapolation)."""
    theta = np.arange(num_positions, dtype=np.float32)
    steps = []
    for _ in range(half):
        steps.append(theta)
        theta = (theta * np.float32(theta_scale)).astype(np.float32)
    angles = np.stack(steps, axis=1)
    if freq_factors is not None:
        angles = (angles / freq_factors.astype(np.float32)).astype(np.float32)
    return (np.float32(freq_scale) * angles).astype(np.float32)


def rope_cos_sin(num_positions: int, half: int, theta_scale: float, freq_scale: float = 1.0,
                 freq_factors: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [num_positions, half] float32 as ggml's rope cache holds them."""
    angles = rope_angles(num_positions, half, theta_scale, freq_scale, freq_factors)
    lib = _libm()
    if lib is None:   # no C math library to ask: correctly rounded, ~99% the same
        log.warning("libm not found: RoPE angles may differ from llama.cpp's in the last bit")
        t = torch.from_numpy(angles).double()
        return t.cos().float(), t.sin().float()
    flat = angles.ravel().tolist()
    cos = np.fromiter((lib.cosf(v) for v in flat), dtype=np.float32, count=len(flat))
    sin = np.fromiter((lib.sinf(v) for v in flat), dtype=np.float32, count=len(flat))
    return torch.from_numpy(cos.reshape(angles.shape)), torch.from_numpy(sin.reshape(angles.shape))
