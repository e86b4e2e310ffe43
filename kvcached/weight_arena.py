"""A model's weights in pool pages, so they can step aside to host memory and come back.

The broker's ladder used to end at unload: weights, usually most of a model's
memory, left only by being freed, and the next request paid a whole load
(file read, compile, graph capture). A `WeightArena` holds tensors that never
change after load (weights, fused projections, constant tables) in one
`VirtualTensor` of the page pool: every tensor is re-pointed (`Tensor.set_`)
at its own slice of the arena, so its address is the arena's and never moves.
Then:

- `to_host()` copies the arena to one pinned host buffer and unmaps its pages
  (offload.save_unmapping: copies overlapped with the unmaps); the tensors keep
  their addresses, which now read the zero page;
- `restore()` maps pages at the same addresses and copies the bytes back
  (offload.restore: maps overlapped with the copies), bit-exact;

so kernels and CUDA graphs captured over the weights stay valid and a model
comes back at copy speed, with no recapture and, its KV kept, no prefill.

Tensors are moved by storage: views of one storage (tied embeddings, row slices
of a fused projection) stay views of one slice. Pages are mapped as the arena
fills and the caching allocator's freed blocks go back to the driver every
`EMPTY_CACHE_EVERY` bytes, so a load peaks at about its weights plus that, not
twice its weights.

The host buffer is kept after a restore (pinning host memory costs ~0.5 s/GiB
against ~18 ms/GiB for the copy itself: the next step-aside would pay the
allocation again); `release_staging()` frees it, and close() does.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kvcached.errors import ClosedError, PoolExhausted
from kvcached.kv_cache import offload
from kvcached.page_pool import PagePool
from kvcached.virtual_tensor import VirtualTensor
from kvcached.vmm import device_sync

log = logging.getLogger(__name__)

ALIGN = 256                    # every storage starts on a 256-byte boundary (vector loads, TMA)
CHUNK = 256 << 20              # bytes copied per step while the previous chunk is unmapped / mapped
EMPTY_CACHE_EVERY = 1 << 30    # adopted bytes between returning the allocator's free blocks


@dataclass
class _Storage:
    """One storage the arena adopts: its tensors, its size, and its slice of the arena."""
    tensors: list[torch.Tensor]
    nbytes: int
    offset: int = 0


def _group_by_storage(tensors: Iterable[torch.Tensor]) -> list[_Storage]:
    groups: dict[int, _Storage] = {}
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        storage = t.untyped_storage()
        group = groups.setdefault(storage.data_ptr(), _Storage([], storage.nbytes()))
        group.tensors.append(t)
    return [g for g in groups.values() if g.nbytes]


class WeightArena:
    """Tensors adopted into pool pages; `to_host()` / `restore()` move their bytes."""

    def __init__(self, pool: PagePool, tensors: Iterable[torch.Tensor]) -> None:
        storages = _group_by_storage(tensors)
        total = 0
        for s in storages:
            s.offset = total
            total += -(-s.nbytes // ALIGN) * ALIGN
        self.nbytes = total                     # bytes the adopted tensors use (aligned)
        self.num_tensors = sum(len(s.tensors) for s in storages)
        pages = -(-total // pool.page_size)
        if pages > pool.stats().available_pages:   # refused before any tensor moves
            raise PoolExhausted(f"weights of {total} bytes need {pages} pages; the pool's budget has "
                                f"{pool.stats().available_pages} free")
        self._vt = VirtualTensor(pool, (max(total, 1),), torch.uint8)
        self._bytes = self._vt.tensor
        self._staging = offload.HostStaging(self._bytes.device, "weights")
        self._away: offload.PausedKV | None = None
        self._closed = False
        try:
            self._adopt(storages)
        except BaseException:   # the device ran out halfway: the caller drops the model
            self._vt.close()
            raise

    # --- load --------------------------------------------------------------------
    def _adopt(self, storages: list[_Storage]) -> None:
        """Copy each storage into its slice and point its tensors there. The old storage
        goes back to the caching allocator once no tensor uses it."""
        arena = self._bytes.untyped_storage()
        since_flush = 0
        for s in storages:
            self._vt.map(s.offset, s.nbytes)
            source = s.tensors[0]
            old = source.untyped_storage()
            with torch.no_grad():
                self._bytes[s.offset:s.offset + s.nbytes].copy_(
                    torch.empty(0, dtype=torch.uint8, device=source.device).set_(old, 0, (s.nbytes,), (1,)))
                for t in s.tensors:
                    start, rem = divmod(s.offset + t.storage_offset() * t.element_size(), t.element_size())
                    assert rem == 0, "arena slices are aligned to every element size"
                    t.set_(arena, start, t.shape, t.stride())
            del old, source
            since_flush += s.nbytes
            if since_flush >= EMPTY_CACHE_EVERY:
                self._flush_allocator()
                since_flush = 0
        self._flush_allocator()

    def _flush_allocator(self) -> None:
        if self._bytes.device.type == "cuda":
            device_sync.synchronize_device(self._bytes.device)
            device_sync.empty_cache()

    # --- the weights rung ----------------------------------------------------------
    @property
    def on_host(self) -> bool:
        return self._away is not None

    @property
    def device_bytes(self) -> int:
        """Bytes mapped on the device (page-rounded)."""
        return self._vt.mapped_bytes

    @property
    def host_bytes(self) -> int:
        """Bytes of the weights in host memory while they are away."""
        return self._away.nbytes if self._away is not None else 0

    @property
    def staging_bytes(self) -> int:
        """Host memory the arena keeps for its copies (pinned on the GPU)."""
        return self._staging.capacity

    def to_host(self) -> int:
        """Copy the weights to host memory and unmap their pages; bytes given back.
        Nothing may read them until restore(). Idempotent (0 when already away)."""
        self._check_open()
        if self._away is not None:
            return 0
        self._vt.pool.backend.synchronize()    # whatever the model queued has read them
        page = self._vt.page_size

        def unmap(offset: int, nbytes: int) -> int:
            first = offset // page
            return self._vt.unmap_pages(first, -(-(offset + nbytes) // page) - first)

        chunk = max(1, CHUNK // page) * page
        self._away, freed = offload.save_unmapping(self._bytes, [(0, self.nbytes)], self._staging, unmap, chunk)
        return freed

    def restore(self) -> int:
        """Map the pages again at the same addresses and copy the weights back, bit-exact;
        bytes mapped. PoolExhausted / DeviceOutOfMemory: stays on the host, nothing lost."""
        self._check_open()
        away = self._away
        if away is None:
            return 0
        pieces = offload.PausedKV(tuple(offload.Extent(off, n, off)
                                        for off, n in offload.split([(0, self.nbytes)], CHUNK)))
        try:
            offload.restore(self._bytes, pieces, self._staging, lambda e: self._vt.map(e.offset, e.nbytes),
                            self._vt.pool.backend.synchronize)
        except BaseException:
            self._vt.unmap_pages(0, self._vt.num_pages)   # back to wholly away
            raise
        self._away = None
        return self._vt.mapped_bytes

    def prepare_staging(self) -> int:
        """Make the host buffer to_host() copies into now, not when memory is short: pinning
        2.3 GiB took 1.2 s of a 1.35 s weights-to-host on the H100 (desktop_pressure_12gib),
        while another application waited. Bytes allocated (0 when kept already)."""
        self._check_open()
        before = self._staging.capacity
        self._staging.get(self.nbytes)
        return self._staging.capacity - before

    def release_staging(self) -> int:
        """Free the kept host buffer (not while the weights are away); its size."""
        return 0 if self._away is not None else self._staging.release()

    # --- life cycle -------------------------------------------------------------------
    def close(self) -> None:
        """Give back every page, the range and the host buffer. The adopted tensors must not
        be used after (the engine moves its model to the meta device first)."""
        if self._closed:
            return
        self._closed = True
        self._vt.close()
        self._staging.release()
        self._away = None

    def __enter__(self) -> "WeightArena":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("weight arena is closed")

    def __repr__(self) -> str:
        where = "host" if self.on_host else "device"
        return f"WeightArena({self.num_tensors} tensors, {self.nbytes} bytes on the {where})"
