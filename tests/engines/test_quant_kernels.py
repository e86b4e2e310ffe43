"""QuantWeight and qlinear against gguf-py's dequantize + an fp32 matmul, per type."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from engines.torch.kernels.quant_ops import qlinear
from engines.torch.kernels.quant_weight import BLOCK_TYPES, SUPPORTED_TYPES, QuantWeight
from tests.engines.quant_blocks import block_bytes

OUT, IN = 16, 512


def _weight(type_name: str, rows: int = OUT, cols: int = IN, seed: int = 0) -> tuple[QuantWeight, torch.Tensor]:
    raw = block_bytes(type_name, rows, cols, seed)
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).copy())
    return QuantWeight.from_gguf(torch.from_numpy(raw.copy()), type_name, (rows, cols), "cpu"), ref


def test_supported_types_are_the_ggml_names():
    assert SUPPORTED_TYPES == BLOCK_TYPES | {"F16", "BF16", "F32"}
    assert all(name in GGMLQuantizationType.__members__ for name in SUPPORTED_TYPES)


@pytest.mark.parametrize("type_name", sorted(BLOCK_TYPES))
def test_round_trip_rows_and_nbytes(type_name: str):
    w, ref = _weight(type_name)
    raw_bytes = block_bytes(type_name, OUT, IN).nbytes
    assert abs(w.nbytes() - raw_bytes) <= 0.03 * raw_bytes
    assert torch.equal(w.dequantize(torch.float32), ref)
    ids = torch.tensor([[3, 0], [15, 3]])
    assert torch.equal(w.rows(ids, torch.float32), ref[ids])


@pytest.mark.parametrize("type_name", ["F16", "BF16", "F32"])
def test_float_types_are_plain_tensors(type_name: str):
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[type_name]
    ref = torch.randn(OUT, IN).to(dtype)
    raw = ref.contiguous().view(torch.uint8).reshape(OUT, -1)
    w = QuantWeight.from_gguf(raw, type_name, (OUT, IN), "cpu")
    assert w.nbytes() == raw.numel()
    assert torch.equal(w.dequantize(dtype), ref)
    x = torch.randn(3, IN)
    torch.testing.assert_close(qlinear(x, w), x @ ref.float().t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("type_name", sorted(BLOCK_TYPES))
def test_qlinear_reference_matches_gguf(type_name: str):
    w, ref = _weight(type_name)
    x = torch.randn(2, 3, IN)
    bias = torch.randn(OUT)
    torch.testing.assert_close(qlinear(x, w, bias), x @ ref.t() + bias, rtol=1e-5, atol=1e-4)


def test_rejects_rows_of_the_wrong_length():
    raw = torch.from_numpy(block_bytes("Q4_K", OUT, IN).copy())
    with pytest.raises(ValueError):
        QuantWeight.from_gguf(raw, "Q4_K", (OUT, IN + 256), "cpu")
