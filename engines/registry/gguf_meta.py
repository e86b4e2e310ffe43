"""What a GGUF file says about its model, read from the header alone.

The registry lists every model a user has, so reading one must be cheap: this
walks the GGUF header (key/values, then tensor infos) through a read-only mmap
and never touches tensor data. Big arrays (the vocabulary, merges, scores)
are skipped, except that token texts are matched against the FIM tokens
llama.cpp recognises, because older conversions mark FIM only in the
vocabulary. `gguf.GGUFReader` parses the same header but materialises every
array: about 4 s of CPU for the 135M SmolLM2, too slow for a model list.
Names and types come from the `gguf` package's constants.
"""
from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGUF_MAGIC, GGMLQuantizationType, GGUFValueType, Keys, LlamaFileType

from engines.errors import ModelLoadError

# Scalar value types: struct format and size (GGUF is little-endian).
SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
MAX_KEPT_ARRAY = 64          # arrays longer than this are skipped, their length kept
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and predates every model in use

# FIM token ids by metadata key: (prefix, suffix, middle). Newer conversions write
# the fim_* keys; older ones (CodeLlama) the prefix/suffix/middle ones.
FIM_KEYS = ((Keys.Tokenizer.FIM_PRE_ID, Keys.Tokenizer.FIM_SUF_ID, Keys.Tokenizer.FIM_MID_ID),
            (Keys.Tokenizer.PREFIX_ID, Keys.Tokenizer.SUFFIX_ID, Keys.Tokenizer.MIDDLE_ID))
# Token texts llama.cpp's vocabulary loader takes as FIM tokens when the keys are absent.
FIM_TEXTS: dict[str, tuple[bytes, ...]] = {
    "pre": (b"<|fim_prefix|>", b"<fim-prefix>", b"<fim_prefix>", b"<|fim_begin|>", b"<PRE>", b"\xe2\x96\x81<PRE>"),
    "suf": (b"<|fim_suffix|>", b"<fim-suffix>", b"<fim_suffix>", b"<|fim_hole|>", b"<SUF>", b"\xe2\x96\x81<SUF>"),
    "mid": (b"<|fim_middle|>", b"<fim-middle>", b"<fim_middle>", b"<|fim_end|>", b"<MID>", b"\xe2\x96\x81<MID>"),
}
_FIM_BY_TEXT = {text: role for role, texts in FIM_TEXTS.items() for text in texts}
_FIM_LENGTHS = {len(text) for text in _FIM_BY_TEXT}


@dataclass(frozen=True)
class GgufMeta:
    """The header facts the registry and engines need."""
    path: str
    version: int
    architecture: str
    name: str
    parameter_count: int
    quantization: str
    context_length: int
    fim_token_ids: tuple[int, int, int] | None   # (prefix, suffix, middle) or None
    chat_template: str
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    vocab_size: int
    tensor_count: int
    kv: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    tensors: dict[str, int] = field(default_factory=dict, compare=False, hash=False)   # name -> GGML type

    @property
    def can_infill(self) -> bool:
        return self.fim_token_ids is not None


class Cursor:
    """Little-endian reads over a read-only buffer, bounds-checked."""

    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelLoadError(f"{self.path}: GGUF header is truncated or corrupt at byte {self.pos}")

    def scalar(self, fmt: str) -> object:
        n = struct.calcsize(fmt)
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def raw_string(self) -> bytes:
        n = self.scalar("<Q")
        self.need(n)
        start, self.pos = self.pos, self.pos + n
        return self.buf[start:self.pos]

    def string(self) -> str:
        return self.raw_string().decode("utf-8", errors="replace")


def value_type(cur: Cursor) -> GGUFValueType:
    code = cur.scalar("<I")
    try:
        return GGUFValueType(code)
    except ValueError:
        raise ModelLoadError(f"{cur.path}: unknown GGUF value type {code} at byte {cur.pos}") from None


def _read_array(cur: Cursor, key: str, fim_found: dict[str, int]) -> object:
    elem = value_type(cur)
    count = cur.scalar("<Q")
    if elem == GGUFValueType.STRING:
        scan_fim = key == Keys.Tokenizer.LIST
        kept: list[str] = []
        for index in range(count):
            n = cur.scalar("<Q")
            cur.need(n)
            if count <= MAX_KEPT_ARRAY:
                kept.append(bytes(cur.buf[cur.pos:cur.pos + n]).decode("utf-8", errors="replace"))
            elif scan_fim and n in _FIM_LENGTHS:
                role = _FIM_BY_TEXT.get(bytes(cur.buf[cur.pos:cur.pos + n]))
                if role is not None:
                    fim_found.setdefault(role, index)
            cur.pos += n
        return kept if count <= MAX_KEPT_ARRAY else count
    if elem == GGUFValueType.ARRAY:
        raise ModelLoadError(f"{cur.path}: nested GGUF arrays under {key!r} are not supported")
    fmt = SCALARS[elem]
    size = struct.calcsize(fmt)
    cur.need(size * count)
    if count <= MAX_KEPT_ARRAY:
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", cur.buf, cur.pos))
        cur.pos += size * count
        return values
    cur.pos += size * count
    return count


def _read_kv(cur: Cursor, kv_count: int) -> tuple[dict[str, object], dict[str, int]]:
    kv: dict[str, object] = {}
    fim_found: dict[str, int] = {}
    for _ in range(kv_count):
        key = cur.string()
        vtype = value_type(cur)
        if vtype == GGUFValueType.STRING:
            kv[key] = cur.string()
        elif vtype == GGUFValueType.ARRAY:
            kv[key] = _read_array(cur, key, fim_found)
        else:
            kv[key] = cur.scalar(SCALARS[vtype])
    return kv, fim_found


def _read_tensor_infos(cur: Cursor, tensor_count: int) -> tuple[int, Counter, dict[str, int]]:
    """Parameter count, how many 2-D+ tensors each quantization type holds, and each
    tensor's type by name (the engine choice reads the layout from the names)."""
    params, types, by_name = 0, Counter(), {}
    for _ in range(tensor_count):
        name = cur.raw_string()
        n_dims = cur.scalar("<I")
        if n_dims > 8:
            raise ModelLoadError(f"{cur.path}: tensor with {n_dims} dimensions; the header is corrupt")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        ttype = cur.scalar("<I")
        cur.scalar("<Q")  # data offset: tensor data is never read here
        params += math.prod(dims)
        by_name[name.decode("utf-8", errors="replace") if isinstance(name, bytes) else str(name)] = ttype
        if n_dims >= 2:
            types[ttype] += 1
    return params, types, by_name


def _quantization(kv: dict[str, object], tensor_types: Counter) -> str:
    file_type = kv.get(Keys.General.FILE_TYPE)
    if isinstance(file_type, int):
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    if tensor_types:  # no file_type key: name the type most weight matrices use
        code = tensor_types.most_common(1)[0][0]
        try:
            return GGMLQuantizationType(code).name
        except ValueError:
            return f"type{code}"
    return ""


def _fim_ids(kv: dict[str, object], fim_found: dict[str, int]) -> tuple[int, int, int] | None:
    for keys in FIM_KEYS:
        ids = [kv.get(k) for k in keys]
        # Some conversions write -1 (as uint32: 2**32 - 1) for "absent".
        if all(isinstance(i, int) and 0 <= i < 2**31 for i in ids):
            return (ids[0], ids[1], ids[2])
    if all(role in fim_found for role in ("pre", "suf", "mid")):
        return (fim_found["pre"], fim_found["suf"], fim_found["mid"])
    return None


def _int(kv: dict[str, object], key: str, default: int = 0) -> int:
    value = kv.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def read_gguf_meta(path: str | Path) -> GgufMeta:
    """Read the header of a GGUF file. Raises ModelLoadError naming the file and the fault."""
    path = str(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(Cursor(buf, path))
    except (OSError, ValueError) as exc:  # ValueError: mmap of an empty file
        raise ModelLoadError(f"{path}: cannot read GGUF header: {exc}") from exc


def _parse(cur: Cursor) -> GgufMeta:
    magic = cur.scalar("<I")
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{cur.path}: not a GGUF file (magic {magic:#010x})")
    version = cur.scalar("<I")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{cur.path}: GGUF version {version} is not supported "
                             f"(only {', '.join(map(str, SUPPORTED_VERSIONS))}; big-endian files are not)")
    tensor_count, kv_count = cur.scalar("<Q"), cur.scalar("<Q")
    kv, fim_found = _read_kv(cur, kv_count)
    params, tensor_types, tensors = _read_tensor_infos(cur, tensor_count)
    arch = str(kv.get(Keys.General.ARCHITECTURE, "") or "unknown")
    tokens = kv.get(Keys.Tokenizer.LIST)
    vocab = tokens if isinstance(tokens, int) else len(tokens) if isinstance(tokens, list) else 0
    return GgufMeta(
        path=cur.path, version=version, architecture=arch,
        name=str(kv.get(Keys.General.NAME, "") or ""),
        parameter_count=params, quantization=_quantization(kv, tensor_types),
        context_length=_int(kv, f"{arch}.context_length", 2048),
        fim_token_ids=_fim_ids(kv, fim_found),
        chat_template=str(kv.get(Keys.Tokenizer.CHAT_TEMPLATE, "") or ""),
        block_count=_int(kv, f"{arch}.block_count"),
        embedding_length=_int(kv, f"{arch}.embedding_length"),
        head_count=_int(kv, f"{arch}.attention.head_count"),
        head_count_kv=_int(kv, f"{arch}.attention.head_count_kv", _int(kv, f"{arch}.attention.head_count")),
        vocab_size=_int(kv, f"{arch}.vocab_size", vocab),
        tensor_count=tensor_count, kv=kv, tensors=tensors,
    )
