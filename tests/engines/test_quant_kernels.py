"""QuantWeight, the Triton quantized kernels (through the interpreter here) and the
reference path of qlinear, against gguf-py's dequantize + an fp32 matmul, per type.

Bounds: every decoder is exact (dequantize tests compare bits), so a kernel's only
error is the float32 summation order of its dot products. It is stated per type
as a fraction of sum_k |x_k * w_k| per output, the scale a reordered fp32 sum can
err on: K * 2^-24 ~ 3e-5 at K=544 bounds it for every type; the K-quants' wider
scale range changes nothing here because the bound is relative.
"""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from engines.torch.kernels import quant_kernels
from engines.torch.kernels.quant_ops import qlinear
from engines.torch.kernels.quant_weight import BLOCK_TYPES, SUPPORTED_TYPES, QuantWeight
from tests.engines.quant_blocks import block_bytes, random_blocks

OUT, IN = 16, 512
RAGGED_IN = 544   # legacy types: rows of 17 blocks, not whole 256-weight chunks (SmolLM2's 576 is 18)
BOUND = dict.fromkeys(sorted(BLOCK_TYPES), 3e-5)   # fraction of sum |x * w| per output


def _weight(type_name: str, rows: int = OUT, cols: int = IN, seed: int = 0, *, real: bool = True):
    raw = (block_bytes if real else random_blocks)(type_name, rows, cols, seed)
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).copy())
    return QuantWeight.from_gguf(torch.from_numpy(raw.copy()), type_name, (rows, cols), "cpu"), ref


def _assert_within(got: torch.Tensor, x: torch.Tensor, ref: torch.Tensor, bound: float, bias=None):
    want = x.float() @ ref.t() + (0 if bias is None else bias)
    scale = x.float().abs() @ ref.abs().t()
    assert torch.all((got.float() - want).abs() <= bound * scale + 1e-6), (got.float() - want).abs().max()


def _in_features(type_name: str) -> int:
    return IN if type_name.endswith("_K") else RAGGED_IN


def test_supported_types_are_the_ggml_names():
    assert SUPPORTED_TYPES == BLOCK_TYPES | {"F16", "BF16", "F32"}
    assert all(name in GGMLQuantizationType.__members__ for name in SUPPORTED_TYPES)


@pytest.mark.parametrize("type_name", sorted(BLOCK_TYPES))
def test_round_trip_rows_and_nbytes(type_name: str):
    w, ref = _weight(type_name)
    raw = block_bytes(type_name, OUT, IN)
    assert w.nbytes() == raw.nbytes   # the repack moves fields, it adds no byte
    assert torch.equal(w.raw_rows(), torch.from_numpy(raw))
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
    assert torch.equal(w.rows(torch.tensor([2, 5]), dtype), ref[[2, 5]])
    x = torch.randn(3, IN)
    torch.testing.assert_close(qlinear(x, w), x @ ref.float().t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("type_name", sorted(BLOCK_TYPES))
def test_qlinear_reference_matches_gguf(type_name: str):
    w, ref = _weight(type_name)
    x = torch.randn(2, 3, IN)
    bias = torch.randn(OUT)
    got = qlinear(x, w, bias)
    assert got.shape == (2, 3, OUT)
    _assert_within(got.reshape(6, OUT), x.reshape(6, IN), ref, BOUND[type_name], bias)


def test_rejects_rows_of_the_wrong_length_and_unknown_types():
    raw = torch.from_numpy(block_bytes("Q4_K", OUT, IN).copy())
    with pytest.raises(ValueError):
        QuantWeight.from_gguf(raw, "Q4_K", (OUT, IN + 256), "cpu")
    with pytest.raises(ValueError):
        QuantWeight.from_gguf(raw, "IQ4_XS", (OUT, IN), "cpu")


@pytest.mark.parametrize("type_name", sorted(BLOCK_TYPES))
def test_triton_dequantize_is_exact(type_name: str):
    w, ref = _weight(type_name, 20, _in_features(type_name), real=False)
    assert quant_kernels.kernel_ready(w)
    assert torch.equal(quant_kernels.dequantize(w, torch.float32), ref)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_0", "Q4_K", "Q6_K"])
def test_triton_dequantize_of_chosen_rows_is_an_embedding_lookup(type_name: str):
    """One launch reading rows by id (repeated, out of order, the last): the rows as
    dequantized whole."""
    w, ref = _weight(type_name, 20, _in_features(type_name), real=False)
    ids = torch.tensor([19, 3, 3, 0, 7])
    assert torch.equal(quant_kernels.dequantize(w, torch.float32, block_n=1, ids=ids), ref[ids])


@pytest.mark.parametrize("type_name", sorted(BLOCK_TYPES))
def test_triton_matvec(type_name: str):
    """M = 1 and 3 rows (padded to 4 in the kernel), 6 outputs (ragged for 4 rows a program), the
    default launch (byte-pair decoders where the type has them; 8 chunks a step: past the
    row's end the chunk is clamped and x masked), the generic tile at 4 rows by 1 chunk, and
    K split in two with a bias."""
    k = _in_features(type_name)
    w, ref = _weight(type_name, 6, k, seed=1)
    x = torch.randn(3, k)
    _assert_within(quant_kernels.qmatvec(x[:1], w, split=1), x[:1], ref, BOUND[type_name])
    _assert_within(quant_kernels.qmatvec(x[:1], w, block_n=4, chunks_per_step=1, paired=False), x[:1], ref,
                   BOUND[type_name])
    bias = torch.randn(6)
    _assert_within(quant_kernels.qmatvec(x, w, bias, split=2, chunks_per_step=1), x, ref, BOUND[type_name], bias)


def test_short_rows_take_four_chunks_a_step_and_warps_by_rows():
    """At one row of x a row of <= 1,024 weights is read in one four-chunk step: four warps a
    program over few rows, one over many (quant_small.json); elsewhere the type's launch."""
    assert quant_kernels.launch_for("Q5_0", 576, 576, 1) == (1, 4, 4)
    assert quant_kernels.launch_for("Q5_0", 3072, 576, 1) == (1, 4, 1)
    assert quant_kernels.launch_for("Q5_0", 3072, 576, 2) == quant_kernels.LAUNCH["Q5_0"]
    assert quant_kernels.launch_for("Q4_K", 576, 1536, 1) == quant_kernels.LAUNCH["Q4_K"]
    w, ref = _weight("Q5_0", 6, 576, seed=4)          # SmolLM2's width: 2.25 chunks, the tail masked
    x = torch.randn(1, 576)
    _assert_within(quant_kernels.qmatvec(x, w), x, ref, BOUND["Q5_0"])


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q8_0", "Q5_0"])
def test_triton_dequantize_tile_matmul(type_name: str):
    k = _in_features(type_name)
    w, ref = _weight(type_name, 20, k, seed=2)
    x = torch.randn(24, k).half()
    got = quant_kernels.qmatmul_fused(x, w, block_m=16, block_n=16)
    # fp16 tiles: each weight rounds to fp16 (2^-11) before the tensor-core dot
    _assert_within(got, x, ref, 2e-3)


def test_qlinear_is_one_op_under_torch_compile():
    """fullgraph: a graph break (Dynamo tracing the launchers) would raise."""
    w, ref = _weight("Q6_K", seed=3)
    f16 = QuantWeight.from_gguf(torch.randn(OUT, OUT).half().view(torch.uint8), "F16", (OUT, OUT), "cpu")

    def step(x: torch.Tensor) -> torch.Tensor:
        return qlinear(torch.relu(qlinear(x, w)), f16) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, IN)
    torch.testing.assert_close(compiled(x), step(x))


def test_concat_and_row_slice():
    a, ref_a = _weight("Q4_K", seed=5)
    b, ref_b = _weight("Q4_K", 8, IN, seed=6)
    both = QuantWeight.concat([a, b])
    assert both.shape == (OUT + 8, IN) and both.nbytes() == a.nbytes() + b.nbytes()
    assert torch.equal(both.dequantize(), torch.cat([ref_a, ref_b]))
    assert torch.equal(both.row_slice(OUT, OUT + 8).dequantize(), ref_b)
    with pytest.raises(ValueError):
        QuantWeight.concat([a, _weight("Q6_K")[0]])


def test_repeated_rows_compute_one_row_and_repeat_it(monkeypatch):
    """quant_ops.repeated_rows (a graph of one request padded to two equal rows, batch_one.py):
    the projection computes row 0 alone and repeats it: what two rows give, to float32 rounding."""
    from engines.torch.kernels import quant_ops

    w, ref = _weight("Q4_K")
    row = torch.randn(1, 1, IN)
    x = torch.cat([row, row])                            # [2, 1, IN]: the padded batch
    want = qlinear(x, w)
    seen = []
    reference = quant_ops.qlinear_reference
    monkeypatch.setattr(quant_ops, "qlinear_reference", lambda x, w, b=None: seen.append(x.shape) or reference(x, w, b))
    with quant_ops.repeated_rows():
        got = qlinear(x, w)
    assert [tuple(shape) for shape in seen] == [(1, IN)] and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)     # one row's sums, not two rows'
    assert qlinear(x, w).shape == want.shape and tuple(seen[-1]) == (2, 1, IN)   # off again outside
