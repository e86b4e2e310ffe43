"""GGUF block bytes of every type the quantized kernels read, for tests.

gguf-py quantizes only the legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1); the
K-quant blocks are random bytes with their fp16 super-block scales set to
small finite values, so every bit pattern of quants and sub-scales is covered
and `gguf.quants.dequantize` stays the judge of what the bytes mean.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# K type -> byte offsets of its fp16 super-block fields (d, and dmin where it has one)
K_FP16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def block_bytes(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, row_bytes] as a GGUF stores a [rows, cols] weight of `type_name`."""
    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[type_name]
    if type_name in LEGACY:
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for offset in K_FP16_FIELDS[type_name]:
        scale = rng.uniform(0.002, 0.02, raw.shape[0]).astype(np.float16)
        raw[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)
