"""The Triton decode-attention kernel on the CPU through Triton's interpreter
(TRITON_INTERPRET=1), against its torch reference, on every family's attention:
head dims 64, 96 (Phi-3: not a power of two), 256 (Gemma); query scale,
Gemma 2's soft-cap, sliding windows shorter than the history, partial RoPE
(Phi-4-mini). The same check runs on the GPU at load (Runner) and in tests/gpu.
Skipped where Triton is not installed (the CPU build of torch ships without it).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.torch.kernels.decode_attention import self_check  # noqa: E402
from engines.torch.model.attention import AttnSpec  # noqa: E402

SPECS = {
    "plain": AttnSpec(),
    "gemma2": AttnSpec(scale=0.07, softcap=1.5, window=40),
    "gemma3-local": AttnSpec(window=100),
    "phi4-partial-rope": AttnSpec(rope_dim=48),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("num_heads,num_kv,head_dim", [(4, 2, 64), (4, 1, 96), (2, 1, 256)])
def test_kernel_matches_reference_on_every_family_attention(num_heads, num_kv, head_dim):
    specs = tuple(s for s in SPECS.values() if s.rope_dim < head_dim)
    assert self_check(torch.device("cpu"), torch.float32, num_heads, num_kv, head_dim, specs)
