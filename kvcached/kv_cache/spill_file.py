"""A paused KV cache's host copy spilled to one file, and read back, checksummed.

Written when the host itself runs short of memory (kvcached/broker/host_relief.py):
the bytes stream from the host buffer to the file and back into it in chunks,
never a second whole copy in memory, which is what the host lacks. The file is
read back only when it is whole and unchanged and was written for this cache
(`identity`: a random id per cache and the byte count); anything else raises
`KVFileRejected` naming what was wrong, and nothing of it reaches the model.

Layout: SPILL_MAGIC (8 bytes) | header length (8, little endian) | header (JSON)
| payload | SHA-256 of everything before it (32 bytes). Written to a temporary
name, fsynced, renamed: a crash leaves no half file under the real name.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from kvcached.errors import KVFileRejected

SPILL_MAGIC = b"EBTSPL\x00\x01"
SUFFIX = ".kvspill"
_DIGEST = 32
_CHUNK = 16 << 20


def _bytes(buffer) -> np.ndarray:
    """A uint8 view of a CPU torch tensor (its .numpy()) or of any bytes-like object."""
    return buffer.numpy() if hasattr(buffer, "numpy") else np.frombuffer(buffer, dtype=np.uint8)


def write(path: Path, identity: dict, payload) -> int:
    """payload: a uint8 tensor on the CPU, or any bytes-like object. Returns the file's size."""
    data = _bytes(payload)
    header = json.dumps({"identity": identity, "nbytes": int(data.size)}, sort_keys=True).encode()
    head = SPILL_MAGIC + struct.pack("<Q", len(header)) + header
    digest = hashlib.sha256(head)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for start in range(0, data.size, _CHUNK):
                piece = memoryview(data[start:start + _CHUNK])
                digest.update(piece)
                f.write(piece)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(head) + data.size + _DIGEST


def read_into(path: Path, identity: dict, out) -> None:
    """Fill `out` (a uint8 CPU tensor or a writable bytes-like object of the payload's size)
    from path, or raise KVFileRejected. Torch-free: the llama.cpp engine uses it too."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(SPILL_MAGIC) + 8)
            if len(head) < len(SPILL_MAGIC) + 8 or not head.startswith(SPILL_MAGIC):
                raise KVFileRejected(f"{name}: not a spilled KV file, or truncated before its header")
            (header_len,) = struct.unpack("<Q", head[len(SPILL_MAGIC):])
            header = f.read(header_len)
            meta = _meta(name, header, identity)
            data = _bytes(out)
            if size != len(head) + header_len + meta["nbytes"] + _DIGEST or meta["nbytes"] != data.size:
                raise KVFileRejected(f"{name}: truncated or of another size ({size} bytes on disk)")
            digest = hashlib.sha256(head + header)
            for start in range(0, data.size, _CHUNK):
                piece = memoryview(data[start:start + _CHUNK])
                if f.readinto(piece) != len(piece):
                    raise KVFileRejected(f"{name}: truncated while reading")
                digest.update(piece)
            if f.read(_DIGEST) != digest.digest():
                raise KVFileRejected(f"{name}: checksum mismatch (corrupted)")
    except OSError as exc:
        raise KVFileRejected(f"{name}: cannot be read ({exc})") from exc


def _meta(name: str, header: bytes, identity: dict) -> dict:
    try:
        meta = json.loads(header)
    except ValueError as exc:
        raise KVFileRejected(f"{name}: header is not JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("identity") != identity or not isinstance(meta.get("nbytes"), int):
        raise KVFileRejected(f"{name}: written for another cache ({meta!r:.200})")
    return meta
