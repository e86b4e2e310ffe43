"""A 2-D weight kept in GGUF block form on the device (issue 16).

A Llama-3.1-8B Q4_K_M file is 4.9 GB; dequantized to bf16 it is 16 GB and no
longer fits the 8-24 GB cards the product is for. `QuantWeight` holds a
`[out_features, in_features]` weight in the GGUF's own bytes and dequantizes
only what a caller asks for: the whole matrix (checks, fallbacks), a few rows
(embedding lookup), or tiles inside the kernels of `quant_ops`.

The repack is lossless and costs no byte: each block is cut into its fields
(`PLANES`: the packed quants, the high bits, the sub-block scales, the fp16
super-block scales) and every field goes to its own row-major plane. A GGUF
block interleaves 4 bytes of scales with 128 bytes of quants (Q4_K), so a warp
reading a row of blocks would read 144-byte strides; read plane by plane, a
row's quants are one contiguous run, aligned to 16 bytes, that the kernels load
in 16-byte vectors, and the few scale bytes come from a plane that stays in L1.
The 6-bit scales are decoded in the kernel (a handful of integer ops per 32
weights): pre-decoding them to fp16 would cost 11% more bytes for Q4_K, past
the 3% budget of issue 16.

F16/BF16/F32 are plain tensors of the weight's own dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engines.torch.load.dequant import TORCH_DEQUANT, dequantize_raw

FLOAT_TYPES: dict[str, torch.dtype] = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}

U8, I8, F16, I32 = torch.uint8, torch.int8, torch.float16, torch.int32
# ggml type -> its block's fields in kernel order: (name, first byte, bytes, dtype of the plane).
# Together the fields cover the block exactly once (checked at import).
PLANES: dict[str, tuple[tuple[str, int, int, torch.dtype], ...]] = {
    "Q8_0": (("qs", 2, 32, I8), ("d", 0, 2, F16)),
    "Q4_0": (("qs", 2, 16, U8), ("d", 0, 2, F16)),
    "Q4_1": (("qs", 4, 16, U8), ("dm", 0, 4, F16)),
    "Q5_0": (("qs", 6, 16, U8), ("d", 0, 2, F16), ("qh", 2, 4, I32)),
    "Q5_1": (("qs", 8, 16, U8), ("dm", 0, 4, F16), ("qh", 4, 4, I32)),
    "Q2_K": (("qs", 16, 64, U8), ("scales", 0, 16, U8), ("dm", 80, 4, F16)),
    "Q3_K": (("qs", 32, 64, U8), ("hmask", 0, 32, U8), ("scales", 96, 12, U8), ("d", 108, 2, F16)),
    "Q4_K": (("qs", 16, 128, U8), ("dm", 0, 4, F16), ("scales", 4, 12, U8)),
    "Q5_K": (("qs", 48, 128, U8), ("dm", 0, 4, F16), ("scales", 4, 12, U8), ("qh", 16, 32, U8)),
    "Q6_K": (("ql", 0, 128, U8), ("qh", 128, 64, U8), ("scales", 192, 16, I8), ("d", 208, 2, F16)),
}
BLOCK_TYPES = frozenset(PLANES)
SUPPORTED_TYPES: frozenset[str] = BLOCK_TYPES | frozenset(FLOAT_TYPES)


def _check_planes() -> None:
    for name, planes in PLANES.items():
        covered = sorted(b for _, start, size, _ in planes for b in range(start, start + size))
        assert covered == list(range(TORCH_DEQUANT[name][1])), f"{name} planes do not tile its block"


_check_planes()


def interleave_stacks(rows: torch.Tensor, parts: int, groups: int) -> torch.Tensor:
    """[part 0's `groups` stacked groups of rows; part 1's; ...] -> group 0's rows of every
    part, then group 1's... (one copy; rows are independent in every GGUF type): stacked
    experts' gate and up become one stack of [gate_e | up_e] rows an expert."""
    return rows.view(parts, groups, -1, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def plane_names(type_name: str) -> list[str]:
    return [name for name, *_ in PLANES[type_name]] if type_name in PLANES else ["w"]


@dataclass
class QuantWeight:
    """type_name: ggml type; shape: (out_features, in_features);
    planes: the block fields, each [out_features, -1] in its own dtype (PLANES order),
    or for F16/BF16/F32 the one plane "w" holding the weight itself."""
    type_name: str
    shape: tuple[int, int]
    planes: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_plane_list(cls, type_name: str, shape: tuple[int, int], planes: list[torch.Tensor]) -> QuantWeight:
        """The inverse of plane_list (custom ops take tensors, not a QuantWeight)."""
        return cls(type_name, shape, dict(zip(plane_names(type_name), planes)))

    def plane_list(self) -> list[torch.Tensor]:
        """The planes in PLANES order ("w" alone for float types)."""
        return [self.planes[name] for name in plane_names(self.type_name)]

    @classmethod
    def from_gguf(cls, raw: torch.Tensor, type_name: str, shape: tuple[int, int],
                  device: torch.device | str | None = None) -> QuantWeight:
        """raw: uint8 [out_features, row_bytes] exactly as the GGUF stores the rows."""
        if type_name not in SUPPORTED_TYPES:
            raise ValueError(f"no kernel for ggml type {type_name}")
        out_features, in_features = shape
        raw = raw.reshape(out_features, -1).to(device)
        if type_name in FLOAT_TYPES:
            w = raw.contiguous().view(FLOAT_TYPES[type_name]).reshape(out_features, in_features)
            return cls(type_name, (out_features, in_features), {"w": w})
        block, size, _ = TORCH_DEQUANT[type_name]
        if in_features % block or raw.shape[1] != in_features // block * size:
            raise ValueError(f"{type_name} rows of {raw.shape[1]} bytes do not hold {in_features} weights")
        blocks = raw.reshape(out_features, -1, size)
        planes = {name: blocks[:, :, start:start + nbytes].reshape(out_features, -1).contiguous().view(dtype)
                  for name, start, nbytes, dtype in PLANES[type_name]}
        return cls(type_name, (out_features, in_features), planes)

    @classmethod
    def concat(cls, weights: list[QuantWeight]) -> QuantWeight:
        """Stack weights of one type and in_features along out_features (fused QKV or gate/up
        projections: one matvec launch reads them all). Copies the planes once."""
        first = weights[0]
        if any(w.type_name != first.type_name or w.shape[1] != first.shape[1] for w in weights):
            raise ValueError("concat needs one ggml type and one in_features")
        planes = {name: torch.cat([w.planes[name] for w in weights]) for name in first.planes}
        return cls(first.type_name, (sum(w.shape[0] for w in weights), first.shape[1]), planes)

    def row_slice(self, start: int, stop: int) -> QuantWeight:
        """Rows start..stop-1 as a view of the same planes (no copy)."""
        return QuantWeight(self.type_name, (stop - start, self.shape[1]),
                           {name: p[start:stop] for name, p in self.planes.items()})

    @property
    def device(self) -> torch.device:
        return next(iter(self.planes.values())).device

    def nbytes(self) -> int:
        """Bytes held on the device: the GGUF tensor's own bytes."""
        return sum(p.numel() * p.element_size() for p in self.planes.values())

    def raw_rows(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """The GGUF bytes back, uint8 [rows, row_bytes], of rows `ids` (all when None)."""
        out_features = self.shape[0] if ids is None else ids.numel()
        fields: list[tuple[int, torch.Tensor]] = []
        for name, start, nbytes, _ in PLANES[self.type_name]:
            plane = self.planes[name] if ids is None else self.planes[name].index_select(0, ids)
            fields.append((start, plane.contiguous().view(torch.uint8).reshape(out_features, -1, nbytes)))
        return torch.cat([f for _, f in sorted(fields, key=lambda sf: sf[0])], dim=2).reshape(out_features, -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] in `dtype`: the Triton kernel on CUDA, the torch decoders elsewhere (same bits)."""
        if self.type_name in FLOAT_TYPES:
            return self.planes["w"].to(dtype)
        from engines.torch.kernels import quant_kernels

        if self.device.type == "cuda" and quant_kernels.kernel_ready(self):
            return quant_kernels.dequantize(self, dtype)
        return dequantize_raw(self.raw_rows(), self.type_name, self.shape).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows `ids` (any shape) -> [*ids.shape, in]: reads only those rows' blocks
        (an embedding lookup; no host sync, so it runs inside a captured decode step)."""
        flat = ids.reshape(-1).to(self.device)
        from engines.torch.kernels import quant_kernels   # it imports this module

        if self.type_name in FLOAT_TYPES:
            picked = self.planes["w"].index_select(0, flat).to(dtype)
        elif self.device.type == "cuda" and quant_kernels.kernel_ready(self):
            # one launch reading the rows in place (three index_selects and a decode were four)
            picked = quant_kernels.dequantize(self, dtype, block_n=1, ids=flat)
        else:
            chosen = QuantWeight(self.type_name, (flat.numel(), self.shape[1]),
                                 {name: p.index_select(0, flat) for name, p in self.planes.items()})
            picked = chosen.dequantize(dtype)
        return picked.reshape(*ids.shape, self.shape[1])
