"""KV on disk, the cold tier: one file per cached conversation, checksummed, bounded.

A file holds one slot's KV for its first n tokens (token-major, as the cache
keeps it: [n, layers, 2, kv heads, head dim]), the token ids those are the KV
of, and the identity of what computed it (the model file and the KV's shape
and dtype). It is read back only when all of these hold: the magic and
version, a header that parses, the identity equal to the reader's, the payload
exactly as long as the header says, and the SHA-256 of header and payload
equal to the trailer. Anything else (a torn write, a truncated or corrupted
file, another model's KV) raises `KVFileRejected` naming what was wrong, and
the caller logs it and drops the file: a wrong KV would silently corrupt
answers, so nothing half-valid is ever loaded.

Writes go to a temporary name, are fsynced, then renamed: a crash leaves the
old file or none, never half of one. `DiskTier` keeps a folder within a byte
budget, evicting the least recently written files first.

Layout of a file: MAGIC (8 bytes) | header length (8, little endian) | header
(JSON) | payload | SHA-256 of everything before it (32 bytes).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcached.errors import KVFileForeign, KVFileRejected

log = logging.getLogger(__name__)

MAGIC = b"EBTKV\x00\x01\x00"
SUFFIX = ".kv"
_DIGEST = 32
_CHUNK = 8 << 20


@dataclass(frozen=True)
class SavedKV:
    tokens: list[int]
    kv: torch.Tensor          # on the CPU, [n, ...] as written
    window_floor: int = 0     # sliding layers' KV from this token on (zeros before: given back)


def _header(identity: dict, tokens: list[int], kv: torch.Tensor, window_floor: int) -> bytes:
    return json.dumps({"identity": identity, "tokens": tokens, "shape": list(kv.shape),
                       "window_floor": window_floor,
                       "dtype": str(kv.dtype).removeprefix("torch."),
                       "nbytes": kv.numel() * kv.element_size()}, sort_keys=True).encode()


def write(path: Path, identity: dict, tokens: list[int], kv: torch.Tensor, window_floor: int = 0) -> int:
    """Write one conversation's KV atomically (its sliding layers' from window_floor on);
    returns the file's size."""
    if kv.shape[0] != len(tokens):
        raise ValueError(f"KV of {kv.shape[0]} tokens for {len(tokens)} token ids")
    payload = kv.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    header = _header(identity, tokens, kv, window_floor)
    head = MAGIC + struct.pack("<Q", len(header)) + header
    digest = hashlib.sha256(head)
    digest.update(payload)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for part in (head, payload, digest.digest()):
            f.write(part)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(head) + len(payload) + _DIGEST


def read(path: Path, identity: dict) -> SavedKV:
    """The KV in path, if it is whole, untouched and computed by `identity`; else KVFileRejected."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KVFileRejected(f"{path.name}: cannot be read ({exc})") from exc
    meta, payload = _verified_parts(path.name, data)
    if meta.get("identity") != identity:
        raise KVFileForeign(f"{path.name}: computed by another model or KV layout "
                            f"({meta.get('identity')} is not {identity})")
    dtype = getattr(torch, str(meta.get("dtype")), None)
    if not isinstance(dtype, torch.dtype) or len(payload) != meta.get("nbytes"):
        raise KVFileRejected(f"{path.name}: header does not describe its payload")
    kv = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(meta["shape"])
    # A file from before sliding layers gave pages back holds every token: floor 0.
    return SavedKV([int(t) for t in meta["tokens"]], kv, int(meta.get("window_floor", 0)))


def _verified_parts(name: str, data: bytes) -> tuple[dict, bytes]:
    fixed = len(MAGIC) + 8
    if len(data) < fixed + _DIGEST or not data.startswith(MAGIC):
        raise KVFileRejected(f"{name}: not an Ebbtide KV file, or truncated before its header")
    (header_len,) = struct.unpack("<Q", data[len(MAGIC):fixed])
    if fixed + header_len + _DIGEST > len(data):
        raise KVFileRejected(f"{name}: truncated (header says {header_len} bytes, file is {len(data)})")
    if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise KVFileRejected(f"{name}: checksum mismatch (truncated or corrupted)")
    try:
        meta = json.loads(data[fixed:fixed + header_len])
    except ValueError as exc:
        raise KVFileRejected(f"{name}: header is not JSON ({exc})") from exc
    return meta, data[fixed + header_len:-_DIGEST]


class DiskTier:
    """A folder of KV files within max_bytes; the least recently written go first."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.folder.mkdir(parents=True, exist_ok=True)

    def files(self) -> list[Path]:
        """KV files, most recently written first."""
        found = [p for p in self.folder.glob(f"*{SUFFIX}") if p.is_file()]
        return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)

    def put(self, name: str, identity: dict, tokens: list[int], kv: torch.Tensor,
            window_floor: int = 0) -> Path | None:
        """Write name.kv, then evict past the budget; None when one file alone exceeds it."""
        nbytes = kv.numel() * kv.element_size()
        if nbytes > self.max_bytes:
            log.info("KV of %d tokens (%d bytes) exceeds the disk tier's %d bytes: not kept",
                     len(tokens), nbytes, self.max_bytes)
            return None
        path = self.folder / f"{name}{SUFFIX}"
        write(path, identity, tokens, kv, window_floor)
        self._evict()
        return path if path.exists() else None

    def take(self, identity: dict, limit: int) -> list[SavedKV]:
        """Up to `limit` valid files of this identity, newest first, removed from the folder
        (the cache holds them now; the next unload writes them again). Refused files are
        logged and removed; other identities' files are left for their own model."""
        taken = []
        for path in self.files():
            if len(taken) == limit:
                break
            try:
                taken.append(read(path, identity))
            except KVFileForeign:
                continue
            except KVFileRejected as exc:
                log.warning("KV file refused and removed: %s", exc)
            path.unlink(missing_ok=True)
        return taken

    def _evict(self) -> None:
        total = 0
        for path in self.files():
            total += path.stat().st_size
            if total > self.max_bytes:
                log.info("KV disk tier over %d bytes: evicting %s", self.max_bytes, path.name)
                path.unlink(missing_ok=True)
