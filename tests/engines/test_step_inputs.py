"""The decode step's input kernel (engines/torch/kernels/step_inputs.py) through Triton's
interpreter: rows 0, 1, 2 of the host buffer land in ids, positions and slots, and a
batch of any size (the kernel's block is a power of 2 at least 16) is taken whole."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
step_inputs = pytest.importorskip("engines.torch.kernels.step_inputs")
if step_inputs.triton is None:
    pytest.skip("no Triton here", allow_module_level=True)


@pytest.mark.parametrize("batch", [1, 3, 16, 40])
def test_take_splits_the_rows(batch: int) -> None:
    src = torch.arange(3 * batch, dtype=torch.long).reshape(3, batch) + 100
    ids, pos, slots = (torch.full((batch,), -1, dtype=torch.long) for _ in range(3))
    step_inputs.take(src, ids, pos, slots)
    assert torch.equal(torch.stack([ids, pos, slots]), src)
