"""q, k and v of different types in one launch (engines/torch/kernels/quant_group.py),
through Triton's interpreter: the group's output against each weight's own matvec side by
side (the same kernel code per part, so equal to float32 rounding), with biases, with a
deferred norm as x (and the residual sum it writes), and where it is not taken. The GPU runs
it in tests/gpu/test_quant_group_gpu.py."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from engines.torch.kernels import quant_group, quant_kernels  # noqa: E402
from engines.torch.kernels.normed_input import NormedInput  # noqa: E402
from engines.torch.kernels.quant_weight import QuantWeight  # noqa: E402
from tests.engines.quant_blocks import random_blocks  # noqa: E402

# SmolLM2-135M's Q4_K_M layers where v is one step up: q, k Q5_0, v Q8_0 (rows of 576)
SMOLLM2_QKV = (("Q5_0", 64), ("Q5_0", 32), ("Q8_0", 32))


def weights(parts, cols: int = 576) -> list[QuantWeight]:
    return [QuantWeight.from_gguf(torch.from_numpy(random_blocks(t, rows, cols, seed=i).copy()), t, (rows, cols), "cpu")
            for i, (t, rows) in enumerate(parts)]


def side_by_side(x, ws, biases) -> torch.Tensor:
    return torch.cat([quant_kernels.qmatvec(x, w, b) for w, b in zip(ws, biases)], dim=-1)


@pytest.mark.parametrize("parts,rows_of_x", [(SMOLLM2_QKV, 1), ((("Q4_K", 40), ("Q6_K", 24)), 1),
                                             ((("Q4_K", 40), ("Q6_K", 24)), 2),
                                             ((("Q8_0", 16), ("Q4_0", 8), ("Q5_1", 8)), 1),
                                             ((("Q5_0", 16), ("Q4_0", 8), ("Q5_1", 8)), 3)])
def test_group_equals_each_matvec_side_by_side(parts, rows_of_x: int) -> None:
    cols = 512 if parts[0][0] == "Q4_K" else 576
    ws = weights(parts, cols)
    assert quant_group.grouped(ws, rows_of_x)
    x = torch.randn(rows_of_x, cols, generator=torch.Generator().manual_seed(rows_of_x))
    biases = [torch.randn(w.shape[0]) if i == 1 else None for i, w in enumerate(ws)]
    torch.testing.assert_close(quant_group.qmatvec_group(x, ws, biases), side_by_side(x, ws, biases),
                               rtol=1e-5, atol=1e-5)


def test_group_reads_a_deferred_norm_and_writes_the_sum_once() -> None:
    ws = weights(SMOLLM2_QKV)
    gen = torch.Generator().manual_seed(3)
    x, delta, g = torch.randn(1, 576, generator=gen), torch.randn(1, 576, generator=gen), torch.rand(576, generator=gen)
    h = NormedInput(x, delta, g, 1e-5)
    got = quant_group.qmatvec_group(h, ws, [None] * 3)
    alone = NormedInput(x, delta, g, 1e-5)
    torch.testing.assert_close(got, side_by_side(alone, ws, [None] * 3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.sum, x + delta, rtol=0, atol=0)


def test_not_grouped_where_the_parts_would_launch_differently() -> None:
    ws = weights(SMOLLM2_QKV)
    assert not quant_group.grouped(ws[:1], 1)                                   # one part: the lone matvec
    assert not quant_group.grouped(weights((("Q5_0", 8), ("Q5_0", 8)), 576)[:1] + weights((("Q8_0", 8),), 512), 1)
    assert not quant_group.grouped(ws, 2)        # two rows of x: Q5_0 and Q8_0 have launch shapes of their own
    assert not quant_group.grouped(ws, 8)        # Q5_0's matvec stops at 4 rows


def test_the_parts_that_launch_alike_group_without_the_one_that_does_not() -> None:
    """An 8B's q takes dp4a where its k and v take the float matvec: those two group. Here a
    Q8_0 part whose launch shape differs at two rows of x stands for q."""
    from engines.torch.kernels import quant_ops

    q, k, v = weights((("Q8_0", 16), ("Q4_K", 8), ("Q6_K", 8)), 512)
    assert quant_ops._groupable([q, k, v], 2) == [1, 2]
    assert quant_ops._groupable([k, v, q], 2) == [0, 1]
    assert quant_ops._groupable([q, k], 2) == []
