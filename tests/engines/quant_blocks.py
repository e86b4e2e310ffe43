"""GGUF block bytes of every type the quantized kernels read, for tests.

`random_blocks` needs no gguf package (the GPU machine has none): random bytes
with each block's fp16 scale fields set to small finite values, so every bit
pattern of quants and sub-scales is covered. `quantized_blocks` runs gguf-py's
own quantizer, which knows only the legacy types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
Either way gguf-py's `dequantize` (CPU tests) or the torch decoders it is
checked against (GPU tests) judge what the bytes mean.
"""
from __future__ import annotations

import numpy as np

from engines.torch.load.dequant import FP16_FIELDS, TORCH_DEQUANT

LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, row_bytes] as a GGUF stores a [rows, cols] weight of `type_name`."""
    rng = np.random.default_rng(seed)
    block, size, _ = TORCH_DEQUANT[type_name]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for offset in FP16_FIELDS[type_name]:
        scale = rng.uniform(0.002, 0.02, raw.shape[0]).astype(np.float16)
        raw[:, offset:offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def quantized_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """gguf-py's quantization of a standard-normal [rows, cols] weight (legacy types only)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    weights = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return quantize(weights, GGMLQuantizationType[type_name])


def block_bytes(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Real quantization where gguf-py has one, random blocks otherwise."""
    if type_name in LEGACY:
        return quantized_blocks(type_name, rows, cols, seed)
    return random_blocks(type_name, rows, cols, seed)
