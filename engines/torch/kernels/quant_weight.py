"""A 2-D weight kept in GGUF block form on the device (issue 16).

A Llama-3.1-8B Q4_K_M file is 4.9 GB; dequantized to bf16 it is 16 GB and no
longer fits the 8-24 GB cards the product is for. `QuantWeight` holds a
`[out_features, in_features]` weight as the GGUF stores its rows (possibly
repacked losslessly into a layout the kernels read fast), and dequantizes only
what a caller asks for: the whole matrix (checks, fallbacks), a few rows
(embedding lookup), or tiles inside the kernels of `quant_ops`.

F16/BF16/F32 are plain tensors of the weight's own dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.torch.load.dequant import TORCH_DEQUANT, dequantize_raw

FLOAT_TYPES: dict[str, torch.dtype] = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
BLOCK_TYPES = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"})
SUPPORTED_TYPES: frozenset[str] = BLOCK_TYPES | frozenset(FLOAT_TYPES)


@dataclass
class QuantWeight:
    """type_name: ggml type; shape: (out_features, in_features);
    data: [out_features, row_bytes] uint8 GGUF rows (block types) or the plain weight."""
    type_name: str
    shape: tuple[int, int]
    data: torch.Tensor

    @classmethod
    def from_gguf(cls, raw: torch.Tensor, type_name: str, shape: tuple[int, int],
                  device: torch.device | str | None = None) -> QuantWeight:
        """raw: uint8 [out_features, row_bytes] exactly as the GGUF stores the rows."""
        if type_name not in SUPPORTED_TYPES:
            raise ValueError(f"no kernel for ggml type {type_name}")
        out_features, in_features = shape
        raw = raw.reshape(out_features, -1).to(device)
        if type_name in FLOAT_TYPES:
            data = raw.contiguous().view(FLOAT_TYPES[type_name]).reshape(out_features, in_features)
        else:
            block, size, _ = TORCH_DEQUANT[type_name]
            if in_features % block or raw.shape[1] != in_features // block * size:
                raise ValueError(f"{type_name} rows of {raw.shape[1]} bytes do not hold {in_features} weights")
            data = raw.contiguous()
        return cls(type_name, (out_features, in_features), data)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        """Bytes held on the device."""
        return self.data.numel() * self.data.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] in `dtype`."""
        return self._decode(self.data, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows `ids` (any shape) -> [*ids.shape, in]: reads only those rows."""
        picked = self.data.index_select(0, ids.reshape(-1).to(self.data.device))
        return self._decode(picked, dtype).reshape(*ids.shape, self.shape[1])

    def _decode(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.type_name in FLOAT_TYPES:
            return rows.to(dtype)
        return dequantize_raw(rows, self.type_name, (rows.shape[0], self.shape[1])).to(dtype)
