"""GGUF dequantization in torch, on the device the weights go to.

`gguf.quants.dequantize` (numpy, one core) measured on the build CPU: F16 310,
Q8_0 140, Q4_0 141, Q4_1 92, Q6_K ~55 M weights/s, i.e. minutes for an 8B
model. These torch ports of the same formulas (gguf-py's dequantize_blocks,
op for op) run on the GPU, or on all CPU cores, so a GGUF loads in seconds.
Types not in `TORCH_DEQUANT` fall back to gguf.quants; tests check that both
paths give identical floats.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

QK_K = 256


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2k] uint8 -> [n, k] float32 (little-endian fp16 fields)."""
    return b.contiguous().view(torch.float16).float()


def _shifts(start: int, stop: int, step: int, device: torch.device) -> torch.Tensor:
    """Bit shifts as a uint8 tensor made on the device (a kernel, not a host copy: these
    decoders run inside captured CUDA graphs, for embedding rows)."""
    return torch.arange(start, stop, step, dtype=torch.uint8, device=device)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Low nibbles of each `group` bytes, then high nibbles: [n, -1, 2, group]."""
    q = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], -1).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], -1).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Little-endian bit fields: [n, count/8] uint8 -> [n, count] of 0/1 (bit i of the word)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device).reshape(1, 1, 8)
    return ((qh.reshape(qh.shape[0], -1, 1) >> shifts) & 0x01).reshape(qh.shape[0], count)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    ql = _nibbles(b[:, 6:], 16).reshape(b.shape[0], -1)
    q = (ql | (_bits(b[:, 2:6], 32) << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    ql = _nibbles(b[:, 8:], 16).reshape(b.shape[0], -1)
    q = (ql | (_bits(b[:, 4:8], 32) << 4)).float()
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :QK_K // 16], b[:, QK_K // 16:QK_K // 16 + QK_K // 4]
    d, dmin = _f16(b[:, -4:-2]), _f16(b[:, -2:])
    dl = (d * (scales & 0xF).float()).reshape(n, QK_K // 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, QK_K // 16, 1)
    shifts = _shifts(0, 8, 2, b.device).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, -1, 1, 32) >> shifts) & 3).reshape(n, QK_K // 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs = b[:, :QK_K // 8], b[:, QK_K // 8:QK_K // 8 + QK_K // 4]
    scales, d = b[:, 3 * QK_K // 8:3 * QK_K // 8 + 12], _f16(b[:, -2:])
    dev = b.device
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts(0, 8, 4, dev).reshape(1, 2, 1))
    shifts4 = _shifts(0, 8, 2, dev)
    high = (scales[:, 8:].reshape(n, 1, 4) >> shifts4.reshape(1, 4, 1))
    sc = ((low.reshape(n, 16) & 0x0F) | ((high.reshape(n, 16) & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = ((qs.reshape(n, -1, 1, 32) >> shifts4.reshape(1, 1, 4, 1)) & 3).reshape(n, 16, QK_K // 16)
    shifts8 = torch.arange(8, dtype=torch.uint8, device=dev).reshape(1, 1, 8, 1)
    qh = ((hmask.reshape(n, -1, 1, 32) >> shifts8) & 1).reshape(n, 16, QK_K // 16) ^ 1
    q = ql.to(torch.int8) - (qh << 2).to(torch.int8)  # the offset is 4 where the mask bit is 0
    return (dl * q.float()).reshape(n, QK_K)


def _scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K-quant 6-bit scales and mins packed in 12 bytes -> [n, 8] each."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    sc, mn = _scale_min(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, -1, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, -1, 1)
    return d, dm


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k_scales(b)
    q = _nibbles(b[:, 16:], 32).reshape(n, -1, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dm = _k_scales(b)
    qh, qs = b[:, 16:16 + QK_K // 8], b[:, 16 + QK_K // 8:]
    ql = _nibbles(qs, 32).reshape(n, -1, 32)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 1, 8, 1)
    high = ((qh.reshape(n, -1, 1, 32) >> shifts) & 0x01).reshape(n, -1, 32)
    return (d * (ql | (high << 4)).float() - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :QK_K // 2], b[:, QK_K // 2:QK_K // 2 + QK_K // 4]
    scales = b[:, 3 * QK_K // 4:3 * QK_K // 4 + QK_K // 16].contiguous().view(torch.int8).float()
    d = (_f16(b[:, -2:]) * scales).reshape(n, QK_K // 16, 1)
    low = _nibbles(ql, 64).reshape(n, -1, 32)
    shifts = _shifts(0, 8, 2, b.device).reshape(1, 1, 4, 1)
    high = ((qh.reshape(n, -1, 1, 32) >> shifts) & 0x03).reshape(n, -1, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1).float()
    return (d * q).reshape(n, QK_K)


# ggml type -> byte offsets of its block's fp16 scale fields (d, and dmin or m where it has one):
# where random bytes need finite, small scales to be a usable block (tests, shape benchmarks)
FP16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}

# GGML type name -> (weights per block, bytes per block, block decoder)
TORCH_DEQUANT: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "Q8_0": (32, 34, _q8_0),
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q2_K": (QK_K, 84, _q2_k),
    "Q3_K": (QK_K, 110, _q3_k),
    "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k),
    "Q6_K": (QK_K, 210, _q6_k),
}


def dequantize_raw(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """raw uint8 bytes of one tensor (any shape) -> float32 tensor of `shape`, on raw's device."""
    block, size, decode = TORCH_DEQUANT[type_name]
    blocks = raw.reshape(-1, size)
    out = decode(blocks)
    assert out.shape == (blocks.shape[0], block), "block decoder shape"
    return out.reshape(shape)
