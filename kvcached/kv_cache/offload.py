"""Pause and resume: a KV cache's live bytes to host memory and back, bit-exact.

On the GPU the host side is one pinned buffer kept between pause cycles:
allocating pinned memory costs ~0.5 s/GiB while a pinned copy runs at
~55 GB/s each way (pageable: 7-10 GB/s), so paying the allocation once is what
makes a pause cheap the second time. On the host backend the buffer is plain
memory (nothing to pin for).

Bytes are copied as uint8, so NaNs and every bit pattern come back as they went.
Both directions overlap the driver calls with the copy engine, in chunks:
- resume maps a chunk of pages, queues its copy, and maps the next chunk
  while the copy runs (cuMemCreate + cuMemMap + cuMemSetAccess, ~45 us per
  2 MiB handle, would otherwise add ~0.8 s per 16 GiB to ~0.3 s of copying);
- pause copies chunks from a helper thread, one at a time, and the calling
  thread unmaps each chunk's pages as soon as its copy has landed. (Unmapping
  synchronizes the whole context first, so from one thread the copies and the
  unmaps would run strictly one after the other.)
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

STAGING_ROUND = 64 << 20   # grow the staging buffer in 64 MiB steps, never per byte


@dataclass(frozen=True)
class Extent:
    """`nbytes` live bytes at byte `offset` of the cache, kept at `at` in staging."""
    offset: int
    nbytes: int
    at: int


@dataclass(frozen=True)
class PausedKV:
    extents: tuple[Extent, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.extents)

    @property
    def span(self) -> int:
        """Bytes of staging the extents reach: a slot freed or shrunk while paused keeps its
        neighbours' `at` offsets, so this can exceed nbytes."""
        return max((e.at + e.nbytes for e in self.extents), default=0)


def _allocate(nbytes: int, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return torch.empty(nbytes, dtype=torch.uint8)


class HostStaging:
    """The host buffer a cache pauses into; grows when needed, kept otherwise."""

    def __init__(self, device: torch.device, label: str = "KV") -> None:
        self.device = device
        self.label = label            # what the log line calls it: "KV", "weights"
        self._buffer: torch.Tensor | None = None
        # get() may run on a preparing thread (weights' staging made ahead) and a reclaim's.
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    @property
    def is_pinned(self) -> bool:
        return self._buffer is not None and self._buffer.is_pinned()

    def get(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of at least `nbytes` (the kept one when it fits)."""
        with self._lock:
            return self._get_locked(nbytes)

    def _get_locked(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.capacity:
            size = -(-nbytes // STAGING_ROUND) * STAGING_ROUND
            self._buffer = None  # free the old one before allocating the new
            self._buffer = _allocate(size, self.device)
            log.info("%s staging buffer: %d MiB (%s)", self.label, size >> 20,
                     "pinned" if self._buffer.is_pinned() else "pageable")
        assert self._buffer is not None or nbytes == 0
        return self._buffer if self._buffer is not None else torch.empty(0, dtype=torch.uint8)

    def release(self) -> int:
        """Free the buffer (on unload or close); returns its size."""
        with self._lock:
            size, self._buffer = self.capacity, None
        return size


def save_unmapping(device_bytes: torch.Tensor, ranges: Sequence[tuple[int, int]],
                   staging: HostStaging, unmap: Callable[[int, int], int], chunk: int) -> tuple[PausedKV, int]:
    """Copy each (offset, nbytes) range into staging in chunks and call
    unmap(offset, nbytes) for each chunk once its bytes are on the host.
    Returns the paused record and the bytes unmap() gave back."""
    total = sum(n for _, n in ranges)
    host = staging.get(total)
    extents, at = [], 0
    for offset, nbytes in ranges:
        extents.append(Extent(offset, nbytes, at))
        at += nbytes
    pieces = [Extent(off, n, e.at + off - e.offset)
              for e in extents for off, n in split([(e.offset, e.nbytes)], chunk)]
    landed: queue.Queue = queue.Queue()
    copier = threading.Thread(target=_copy_pieces, args=(device_bytes, host, pieces, landed),
                              name="kvcached-pause-copy", daemon=True)
    copier.start()
    freed = 0
    try:
        while (piece := landed.get()) is not None:
            if isinstance(piece, BaseException):
                raise piece
            freed += unmap(piece.offset, piece.nbytes)
    finally:
        copier.join()
    return PausedKV(tuple(extents)), freed


def _copy_pieces(device_bytes: torch.Tensor, host: torch.Tensor, pieces: list[Extent],
                 landed: queue.Queue) -> None:
    """The pause copier: one piece at a time, each announced once it is on the host."""
    device = device_bytes.device
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            for piece in pieces:
                host[piece.at:piece.at + piece.nbytes].copy_(
                    device_bytes[piece.offset:piece.offset + piece.nbytes], non_blocking=True)
                if device.type == "cuda":
                    done = torch.cuda.Event()
                    done.record()
                    done.synchronize()
                landed.put(piece)
    except BaseException as exc:  # handed to the unmapping thread, which raises it
        landed.put(exc)
    landed.put(None)


def restore(device_bytes: torch.Tensor, paused: PausedKV, staging: HostStaging,
            map_extent: Callable[[Extent], None], synchronize: Callable[[], None]) -> None:
    """Map each extent's pages and copy its bytes back; the copy of one extent
    runs while the next one is mapped."""
    host = staging.get(paused.nbytes)
    for extent in paused.extents:
        map_extent(extent)
        device_bytes[extent.offset:extent.offset + extent.nbytes].copy_(
            host[extent.at:extent.at + extent.nbytes], non_blocking=True)
    synchronize()


def split(ranges: Sequence[tuple[int, int]], chunk: int) -> list[tuple[int, int]]:
    """Cut ranges into pieces of at most `chunk` bytes, so mapping overlaps copying."""
    out = []
    for offset, nbytes in ranges:
        for start in range(0, nbytes, chunk):
            out.append((offset + start, min(chunk, nbytes - start)))
    return out
