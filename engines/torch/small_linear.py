"""x @ W.T for decode's few rows on a small weight, in one Triton kernel.

At decode a projection multiplies 1-16 rows by the weight: pure weight reading.
For small models the weights are small too (SmolLM2-135M's largest projection
is 3.5 MB), and cuBLAS spends ~3.5-4 us a call on the H100 whatever the size
(decode_profile.json: 120 GEMMs, 454 of a step's 711 us of kernels). One
program per BLOCK_N output features reads its slice of W once for all rows
(rows padded to 16 for the tensor cores); more programs than SMs keep the
memory system busy. Only for weights up to SMALL_WEIGHT_BYTES, where latency
rather than bandwidth bounds the call; large ones stay on cuBLAS, which reads
them at ~2.8 TB/s.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch: F.linear serves
    triton = None

SMALL_WEIGHT_BYTES = 8 << 20
MAX_ROWS = 16

if triton is not None:
    @triton.jit
    def _small_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, x_sm, w_sn, y_sm,
                             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rows = tl.arange(0, BLOCK_M)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < M
        col_ok = cols < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            k_ok = k < K
            x = tl.load(x_ptr + rows[:, None] * x_sm + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * w_sn + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * y_sm + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def pick_blocks(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): enough programs to cover the SMs, few trips along K."""
    block_n = 16 if n <= 2048 else 32
    block_k = 128 if k <= 1024 else 256
    return block_n, block_k, 4


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] with at most MAX_ROWS rows, on CUDA."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = blocks or pick_blocks(n, k)
    _small_linear_kernel[(triton.cdiv(n, block_n),)](
        x2, weight, bias if bias is not None else weight, y, m, n, k,
        x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y.reshape(*x.shape[:-1], n)


@torch.library.custom_op("ebbtide::small_linear", mutates_args=())
def _small_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return small_linear(x, weight, bias)


@_small_linear_op.register_fake
def _small_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class SmallLinear(nn.Linear):
    """An nn.Linear whose decode calls (<= MAX_ROWS rows) run the Triton kernel;
    prefill's many rows stay on cuBLAS. Same parameters, same names."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> SmallLinear:
        linear.__class__ = cls
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= MAX_ROWS:
            return torch.ops.ebbtide.small_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def is_small(linear: nn.Linear) -> bool:
    w = linear.weight
    return w.numel() * w.element_size() <= SMALL_WEIGHT_BYTES


def self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """The kernel against F.linear on this device; False (and a warning) where it
    cannot build or differs, so the caller keeps cuBLAS."""
    if triton is None or device.type != "cuda":
        return False
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        for m, n, k in ((1, 960, 576), (5, 100, 300), (16, 2048, 2048)):
            x = torch.randn(m, k, generator=gen).to(device, dtype)
            w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
            b = torch.randn(n, generator=gen).to(device, dtype)
            ref = F.linear(x.float(), w.float(), b.float())
            got = small_linear(x, w, b).float()
            if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2):
                log.warning("Triton small linear differs from F.linear (max %.3g): not used",
                            (got - ref).abs().max().item())
                return False
        return True
    except Exception:
        log.warning("Triton small linear unavailable here; using cuBLAS", exc_info=True)
        return False
