"""A GGUF file opened for loading: every key/value and every tensor, parsed fast.

Why not `gguf.GGUFReader`: it builds numpy objects for each element of every array,
and a vocabulary is hundreds of thousands of strings (tokens, merges). Opening a
Llama-3.2-1B-shaped file (128k tokens, 280k merges) took 3.5 s of CPU on the build
machine before a byte of weights moved, and every load pays it again: a large part
of issue 22's two seconds. Here the header is walked once with `struct` over an mmap
(engines.registry.gguf_meta's cursor), numeric arrays come out of one
`numpy.frombuffer` each, strings out of one bytes slice each; tensors are numpy views
of a read-only memory map, shaped and typed exactly as GGUFReader shapes them
(`gguf.ReaderTensor`: quantized types as uint8 rows of bytes, float types typed), so
the loaders read either.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType
from gguf.gguf_reader import ReaderTensor
from gguf.quants import quant_shape_to_byte_shape

from engines.errors import ModelLoadError
from engines.registry.gguf_meta import SCALARS, SUPPORTED_VERSIONS, Cursor, value_type

# Tensor types numpy reads as themselves; every other type is rows of bytes.
_TYPED = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}
_LENGTH = struct.Struct("<Q")


class GgufFile:
    """`metadata`: key -> value (str, int, float, bool, or a list of them), as
    `ReaderField.contents()` gives; `tensors`: `gguf.ReaderTensor`s in file order."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                header = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ModelLoadError(f"GGUF file not found: {path}") from None
        except (OSError, ValueError) as exc:   # a directory, an empty file
            raise ModelLoadError(f"not a readable GGUF file: {path} ({exc})") from None
        try:
            cur = Cursor(header, self.path)
            tensor_count, kv_count = _preamble(cur)
            self.metadata = {key: value for key, value in (_key_value(cur) for _ in range(kv_count))}
            infos = [_tensor_info(cur) for _ in range(tensor_count)]
            data_start = _aligned(cur.pos, int(self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)))
        finally:
            header.close()
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.tensors = [self._tensor(data_start, *info) for info in infos]

    def _tensor(self, data_start: int, name: str, dims: list[int], type_code: int, offset: int) -> ReaderTensor:
        try:
            ggml_type = GGMLQuantizationType(type_code)
        except ValueError:
            raise ModelLoadError(f"{self.path}: tensor {name} has GGML type {type_code}, which this gguf "
                                 "package does not know (a newer llama.cpp type?)") from None
        n_elements = int(np.prod(dims)) if dims else 1
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = n_elements * type_size // block_size
        start = data_start + offset
        if start + n_bytes > self._map.size:
            raise ModelLoadError(f"{self.path}: tensor {name} ends past the end of the file (truncated?)")
        np_dims = tuple(reversed(dims))
        raw = self._map[start:start + n_bytes]
        if ggml_type in _TYPED:
            data = raw.view(_TYPED[ggml_type]).reshape(np_dims)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(np_dims, ggml_type))
        return ReaderTensor(name=name, tensor_type=ggml_type, shape=np.array(dims, dtype=np.uint64),
                            n_elements=n_elements, n_bytes=n_bytes, data_offset=start, data=data, field=None)


def _preamble(cur: Cursor) -> tuple[int, int]:
    if cur.scalar("<I") != GGUF_MAGIC:
        raise ModelLoadError(f"not a readable GGUF file: {cur.path} (it does not start with GGUF's magic)")
    version = cur.scalar("<I")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{cur.path}: GGUF version {version} is not supported "
                             f"(readable: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    return cur.scalar("<Q"), cur.scalar("<Q")


def _key_value(cur: Cursor) -> tuple[str, Any]:
    key = _text(cur, cur.raw_string(), "a key")
    vtype = value_type(cur)
    if vtype == GGUFValueType.STRING:
        return key, _text(cur, cur.raw_string(), key)
    if vtype == GGUFValueType.ARRAY:
        return key, _array(cur, key)
    return key, cur.scalar(SCALARS[vtype])


def _array(cur: Cursor, key: str) -> list:
    elem = value_type(cur)
    count = cur.scalar("<Q")
    if elem == GGUFValueType.STRING:
        return _strings(cur, key, count)
    if elem == GGUFValueType.ARRAY:
        raise ModelLoadError(f"{cur.path}: nested GGUF arrays under {key!r} are not supported")
    dtype = np.dtype(SCALARS[elem])
    cur.need(dtype.itemsize * count)
    values = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos).tolist()
    cur.pos += dtype.itemsize * count
    return values


def _strings(cur: Cursor, key: str, count: int) -> list[str]:
    """count length-prefixed strings: one slice and one decode each, bounds checked."""
    buf, pos, size, out = cur.buf, cur.pos, cur.size, []
    for _ in range(count):
        if pos + 8 > size:
            cur.pos = pos
            cur.need(8)
        (n,) = _LENGTH.unpack_from(buf, pos)
        pos += 8
        if pos + n > size:
            cur.pos = pos
            cur.need(n)
        out.append(_text(cur, buf[pos:pos + n], key))
        pos += n
    cur.pos = pos
    return out


def _tensor_info(cur: Cursor) -> tuple[str, list[int], int, int]:
    name = _text(cur, cur.raw_string(), "a tensor name")
    n_dims = cur.scalar("<I")
    if n_dims > 8:
        raise ModelLoadError(f"{cur.path}: tensor {name} has {n_dims} dimensions; the header is corrupt")
    dims = [cur.scalar("<Q") for _ in range(n_dims)]
    return name, dims, cur.scalar("<I"), cur.scalar("<Q")


def _text(cur: Cursor, raw: bytes, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{cur.path}: {what} is not UTF-8 ({exc})") from None


def _aligned(offset: int, alignment: int) -> int:
    if alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(f"general.alignment {alignment} is not a power of two")
    return -(-offset // alignment) * alignment
