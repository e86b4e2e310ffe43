"""RoPE's cos/sin table in one launch (engines/torch/kernels/rope_table.py) through Triton's
interpreter, against Rotary's torch ops for full and partial RoPE and a scaled kind (the
magnitude factor): the same float32 formula. The GPU runs it in tests/gpu/test_fused_small_gpu.py."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.torch.kernels import rope_table  # noqa: E402
from engines.torch.model.rope import RopeScaling  # noqa: E402
from engines.torch.model.rotary import Rotary  # noqa: E402


@pytest.mark.parametrize("head_dim,rope_dim,scaling", [
    (64, 64, RopeScaling()), (128, 96, RopeScaling()), (128, 128, RopeScaling("yarn", 4.0, original_max_position=4096)),
])
def test_table_equals_the_torch_ops(head_dim: int, rope_dim: int, scaling: RopeScaling) -> None:
    rotary = Rotary(head_dim, rope_dim, 10000.0, scaling)
    positions = torch.tensor([[0, 1, 7, 4095], [31999, 12, 3, 2]])
    assert not rope_table.usable(positions)          # the CPU keeps the torch ops
    want_cos, want_sin = rotary(positions)
    got_cos, got_sin = rope_table.rope_table(positions, rotary.inv_freq, rotary.mscale, head_dim)
    assert got_cos.shape == want_cos.shape == (2, 1, 4, head_dim)
    torch.testing.assert_close(got_cos, want_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_sin, want_sin, rtol=1e-5, atol=1e-5)


def test_no_positions_no_launch() -> None:
    rotary = Rotary(64, 64, 10000.0)
    cos, sin = rope_table.rope_table(torch.zeros(1, 0, dtype=torch.long), rotary.inv_freq, rotary.mscale, 64)
    assert cos.shape == sin.shape == (1, 1, 0, 64)
