"""KVCache: one model's K and V in a virtual tensor, mapped page by page.

The layout (see layout.py) is token-major slot regions: slot s is
`[max_context, L, 2, H_kv, D]` at a fixed, page-aligned stride, so a sequence
grows from its slot's start one page at a time, one page holds every layer of
many tokens, and each layer's K or V is a strided view attention reads
without a copy. The engine's use:

    slot = kv.acquire_slot()              # a slot whose pages are still mapped first
    with kv.step_guard():                 # resumes a paused cache; blocks reclaim
        kv.ensure(slot, n_tokens)         # pages for tokens [0, n_tokens)
        k, v = kv.layer_kv(slot, layer, n_tokens)   # [H, T, D] views
    kv.free(slot)                         # pages stay mapped for the next sequence

Reclaim (trim, pause) waits until no step runs and keeps new steps out while
it unmaps: unmapping a page a kernel still reads is an illegal-address crash,
and a batched decode reads every slot's region. It only ever takes pages that
hold no live token (trim) or live pages after copying them to host (pause).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from kvcached.config import KvcachedConfig
from kvcached.errors import KVFileRejected
from kvcached.kv_cache import offload, spill_file
from kvcached.kv_cache.layout import KVLayout, KVShape, dtype_name
from kvcached.kv_cache.placement import SlotTable
from kvcached.page_pool import PagePool
from kvcached.virtual_tensor import VirtualTensor
from kvcached.vmm.backend import VmmBackend

log = logging.getLogger(__name__)

RESUME_CHUNK = 256 << 20   # bytes mapped per step of resume while the previous copy runs
PAUSE_CHUNK = 256 << 20    # bytes copied per step of pause while the previous chunk is unmapped


class KVCache:
    """`max_slots` sequences of up to `max_context` tokens of one model's KV. Thread-safe."""

    def __init__(self, pool_or_backend: PagePool | VmmBackend, shape: KVShape, max_slots: int,
                 max_context: int, config: KvcachedConfig | None = None) -> None:
        self.config = config or KvcachedConfig()
        if isinstance(pool_or_backend, PagePool):
            self.pool, self._owns_pool = pool_or_backend, False
        else:
            self.pool, self._owns_pool = PagePool(pool_or_backend, self.config), True
        self.shape = shape
        self.layout = KVLayout(shape, max_slots, max_context, self.pool.page_size)
        self.dtype: torch.dtype = getattr(torch, dtype_name(shape.dtype))
        self.device = self.pool.backend.device
        self._vt = VirtualTensor(self.pool, (self.layout.total_elems,), self.dtype)
        self._flat = self._vt.tensor                      # [S * slot_stride]
        self._bytes = self._flat.view(torch.uint8)        # the same memory, as bytes
        self._table = SlotTable(max_slots)
        self._cond = threading.Condition(threading.RLock())
        self._running = 0          # steps inside step_guard()
        self._reclaiming = 0       # trims/pauses waiting or running: new steps wait
        self._staging = offload.HostStaging(self.device)
        self._paused: offload.PausedKV | None = None
        self._spilled: Path | None = None   # the paused bytes' file, when the host ran short
        self._spilled_bytes = 0             # how much of the staging buffer that file holds
        self._spill_id = uuid.uuid4().hex   # this cache's files are read back by this cache only
        self._closed = False
        # Whether kernels may read a slot past its live tokens (see ensure); the
        # engine that knows its kernels sets it.
        self.tail_readers = True

    # --- slots -------------------------------------------------------------
    def acquire_slot(self, prefer_mapped: bool = True, expected_tokens: int | None = None) -> int:
        """A free slot for a new sequence; PoolExhausted when every slot is live.
        Prefers a slot whose pages are still mapped (best fit for expected_tokens)."""
        with self._cond:
            needed = None if expected_tokens is None else self.layout.pages_for_tokens(expected_tokens)
            slot = self._table.choose(prefer_mapped, needed)
            self._table.acquire(slot)
            return slot

    def free(self, slot: int) -> None:
        """The sequence ended; its pages stay mapped for the next one until trimmed."""
        with self._cond:
            self._table.release(slot)
            if self._paused is not None:   # its paused bytes are not wanted back
                self._truncate_paused(slot, 0)

    def _truncate_paused(self, slot: int, n_tokens: int) -> None:
        """While paused: keep only the first n_tokens of a slot's paused bytes."""
        assert self._paused is not None
        start = self.layout.first_page(slot) * self.layout.page_size
        keep = self.layout.live_bytes_for(n_tokens)
        extents = []
        for e in self._paused.extents:
            if start <= e.offset < start + self.layout.slot_bytes:
                if keep:
                    extents.append(offload.Extent(e.offset, min(e.nbytes, keep), e.at))
            else:
                extents.append(e)
        self._paused = offload.PausedKV(tuple(extents))

    def ensure(self, slot: int, n_tokens: int) -> int:
        """Back tokens [0, n_tokens) of a slot with pages; they become its live tokens.
        Returns bytes newly mapped. PoolExhausted/DeviceOutOfMemory leave it as it was."""
        with self._cond:
            state = self._table.live(slot)
            self.layout.check_tokens(n_tokens)
            if self._paused is not None:
                if n_tokens <= state.num_tokens:   # shrinking needs no pages: stay paused
                    self._truncate_paused(slot, n_tokens)
                    state.num_tokens = n_tokens
                    return 0
                self._resume_locked()
            needed = self.layout.pages_for_tokens(n_tokens)
            mapped = 0
            if needed > state.mapped_pages:
                # A kernel still reading the zero page there (a batched decode over a
                # read-length bucket reads every slot's tail) must finish before the
                # mapping changes. Where no kernel reads past live tokens, none can be
                # there: the device-wide sync is skipped, and with it a stall of every
                # thread's CUDA calls until the GPU drains (three models in one daemon:
                # steps of 37 ms instead of ~5).
                if self.tail_readers:
                    self.pool.backend.synchronize()
                first = self.layout.first_page(slot)
                mapped = self._vt.map_pages(first + state.mapped_pages, needed - state.mapped_pages)
                state.mapped_pages = needed
            state.num_tokens = n_tokens
            return mapped

    def num_tokens(self, slot: int) -> int:
        with self._cond:
            return self._table.live(slot).num_tokens

    # --- views ---------------------------------------------------------------
    def layer_kv(self, slot: int, layer: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's K and V for one layer: two [H, T, D] views, last dim contiguous."""
        return (self._view(self.layout.layer_view(slot, layer, n_tokens, False)),
                self._view(self.layout.layer_view(slot, layer, n_tokens, True)))

    def slot_tokens(self, slot: int, n_tokens: int) -> torch.Tensor:
        """A slot's first n_tokens, all layers, as one contiguous [T, L, 2, H, D] view."""
        return self._view(self.layout.slot_view(slot, n_tokens))

    def export_slot(self, slot: int, n_tokens: int) -> torch.Tensor:
        """A host copy of a slot's first n_tokens ([T, L, 2, H, D]), live or paused: the
        disk tier's input. A paused slot's bytes come from the host copy the pause made."""
        with self._cond:
            if n_tokens > self._table.live(slot).num_tokens:
                raise ValueError(f"slot {slot} holds {self._table.live(slot).num_tokens} tokens, not {n_tokens}")
            view = self.layout.slot_view(slot, n_tokens)
            if self._paused is None:
                return self._view(view).to("cpu", copy=True)
            self._unspill_locked()
            start = self.layout.first_page(slot) * self.layout.page_size
            extent = next(e for e in self._paused.extents if e.offset == start)
            nbytes = n_tokens * self.shape.token_bytes
            host = self._staging.get(self._paused.nbytes)[extent.at:extent.at + nbytes]
            return host.clone().view(self.dtype).reshape(view.size)

    def import_slot(self, slot: int, kv: torch.Tensor) -> None:
        """Make a slot hold this KV ([T, L, 2, H, D], as export_slot gave it): pages mapped
        for its T tokens, bytes copied in. Resumes a paused cache (ensure does)."""
        n_tokens = kv.shape[0]
        with self._cond:
            self.ensure(slot, n_tokens)
            target = self._view(self.layout.slot_view(slot, n_tokens))
            if tuple(target.shape) != tuple(kv.shape) or kv.dtype != self.dtype:
                raise ValueError(f"KV {tuple(kv.shape)} {kv.dtype} does not fit slots of "
                                 f"{tuple(target.shape)} {self.dtype}")
            target.copy_(kv)
            self.pool.backend.synchronize()

    def batched_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V over every slot: [S, H, max_context, D] at fixed addresses
        (pages not mapped read zeros), for batched decode and CUDA graphs."""
        return (self._view(self.layout.batched_view(layer, False)),
                self._view(self.layout.batched_view(layer, True)))

    def _view(self, spec) -> torch.Tensor:
        return self._flat.as_strided(spec.size, spec.stride, spec.offset)

    # --- steps and reclaim exclusion ------------------------------------------
    @contextlib.contextmanager
    def step_guard(self) -> Iterator[None]:
        """Hold while a step reads or writes the cache: no page is unmapped meanwhile.
        A paused cache is resumed first (PoolExhausted if its pages cannot come back)."""
        with self._cond:
            while self._reclaiming:
                self._cond.wait()
            if self._paused is not None:
                self._resume_locked()
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def is_busy(self) -> bool:
        with self._cond:
            return self._running > 0

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Wait for running steps to end, keep new ones out, hold the lock."""
        with self._cond:
            self._reclaiming += 1
            try:
                while self._running:
                    self._cond.wait()
                yield
            finally:
                self._reclaiming -= 1
                self._cond.notify_all()

    # --- reclaim --------------------------------------------------------------
    def trim(self) -> int:
        """Unmap every page that holds no live token; returns bytes given back."""
        with self._exclusive():
            trimmable = self._table.trimmable(self.layout.pages_for_tokens)
            # step_guard ends when a step's kernels are queued, not done: a batched
            # decode may still read these pages. The virtual tensor synchronizes once
            # for all the spans (one cuCtxSynchronize a trim, not one a slot).
            freed = self._vt.unmap_spans([(self.layout.first_page(slot) + first, count)
                                          for slot, first, count in trimmable])
            for slot, first, _ in trimmable:
                self._table.slots[slot].mapped_pages = first
            self._shrink_own_pool()
            return freed

    def pause(self) -> int:
        """Copy live KV to host memory and unmap every page; returns bytes unmapped.
        Idempotent: a paused cache returns 0."""
        with self._exclusive():
            if self._paused is not None:
                return 0
            ranges = [(self.layout.first_page(i) * self.layout.page_size,
                       self.layout.live_bytes_for(s.num_tokens))
                      for i, s in enumerate(self._table.slots) if s.is_live and s.num_tokens]
            page = self.layout.page_size

            def unmap(offset: int, nbytes: int) -> int:
                first = offset // page
                return self._vt.unmap_pages(first, -(-(offset + nbytes) // page) - first)

            # Whatever the engine queued must land before its bytes are copied.
            self.pool.backend.synchronize()
            # Whole pages a chunk: unmapping a chunk must never take bytes of the next.
            chunk = max(1, PAUSE_CHUNK // page) * page
            paused, freed = offload.save_unmapping(self._bytes, ranges, self._staging, unmap, chunk)
            rest = [(self.layout.first_page(i), s.mapped_pages)   # pages past the live tokens
                    for i, s in enumerate(self._table.slots) if s.mapped_pages]
            freed += self._vt.unmap_spans(rest)
            for s in self._table.slots:
                s.mapped_pages = 0
            self._paused = paused
            self._shrink_own_pool()
            log.debug("KV paused: %d live bytes to host, %d bytes unmapped", paused.nbytes, freed)
            return freed

    def _shrink_own_pool(self) -> None:
        """Unmapped pages land in the pool's reserve; a pool this cache made is
        nobody else's, so free them too (a shared pool is the broker's to shrink)."""
        if self._owns_pool:
            self.pool.shrink()

    def resume(self) -> None:
        """Map the live pages again and copy the paused bytes back, bit-exact. Idempotent.
        PoolExhausted/DeviceOutOfMemory: stays paused, nothing lost."""
        with self._cond:
            if self._paused is not None:
                self._resume_locked()

    def _resume_locked(self) -> None:
        self._unspill_locked()
        paused = self._paused
        assert paused is not None
        page = self.layout.page_size
        chunks = offload.PausedKV(tuple(
            offload.Extent(off, n, e.at + (off - e.offset))
            for e in paused.extents
            for off, n in offload.split([(e.offset, e.nbytes)], RESUME_CHUNK)))

        def map_extent(extent: offload.Extent) -> None:
            first = extent.offset // page
            self._vt.map_pages(first, -(-(extent.offset + extent.nbytes) // page) - first)

        try:
            offload.restore(self._bytes, chunks, self._staging, map_extent,
                            self.pool.backend.synchronize)
        except BaseException:
            self._vt.unmap_pages(0, self._vt.num_pages)   # back to fully paused
            raise
        for i, s in enumerate(self._table.slots):
            s.mapped_pages = self.layout.pages_for_tokens(s.num_tokens) if s.is_live else 0
        self._paused = None

    @property
    def is_paused(self) -> bool:
        with self._cond:
            return self._paused is not None

    # --- accounting -----------------------------------------------------------
    def held_bytes(self) -> int:
        """Bytes of mapped pages (device or host backend)."""
        return self._vt.mapped_bytes

    def live_bytes(self) -> int:
        """Bytes of live tokens' K and V (on the host while paused)."""
        with self._cond:
            return self._table.live_tokens() * self.shape.token_bytes

    def paused_host_bytes(self) -> int:
        with self._cond:
            return self._paused.nbytes if self._paused is not None and self._spilled is None else 0

    def paused_disk_bytes(self) -> int:
        with self._cond:
            return self._paused.nbytes if self._spilled is not None else 0

    def staging_bytes(self) -> int:
        """Host memory kept for pause copies (pinned on the GPU), paused or not."""
        return self._staging.capacity

    # --- the host short of memory ---------------------------------------------------
    def spill(self, folder: Path) -> int:
        """While paused: the host copy to a checksummed file in `folder` and the host buffer
        freed (kv_cache/spill_file.py); resume reads it back. Returns host bytes freed."""
        with self._exclusive():
            if self._paused is None or self._spilled is not None or not self._paused.nbytes:
                return 0
            path, span = Path(folder) / f"{self._spill_id}{spill_file.SUFFIX}", self._paused.span
            try:
                spill_file.write(path, self._spill_identity(span), self._staging.get(span)[:span])
            except OSError as exc:   # a full or read-only disk: the KV stays in host memory
                log.warning("paused KV not spilled to %s: %s", path, exc)
                return 0
            self._spilled, self._spilled_bytes = path, span
            log.info("paused KV spilled to %s (%d MiB)", path, self._paused.nbytes >> 20)
            return self._staging.release()

    def release_staging(self) -> int:
        """Free the host buffer kept between pauses (not while paused); its size."""
        with self._cond:
            return 0 if self._paused is not None else self._staging.release()

    def _spill_identity(self, nbytes: int) -> dict:
        return {"cache": self._spill_id, "nbytes": nbytes}

    def _unspill_locked(self) -> None:
        """Read the spilled bytes back into the host buffer. A file that is not whole and ours
        (KVFileRejected) loses the paused KV: every slot is left empty, so nothing reads
        what was not restored, and the error goes up for the engine to forget its prefixes."""
        path = self._spilled
        if path is None:
            return
        span = self._spilled_bytes
        try:
            spill_file.read_into(path, self._spill_identity(span), self._staging.get(span)[:span])
        except KVFileRejected:
            for state in self._table.slots:
                state.num_tokens = state.mapped_pages = 0
            self._paused = None
            raise
        finally:
            self._spilled = None
            path.unlink(missing_ok=True)

    # --- life cycle -------------------------------------------------------------
    def close(self) -> None:
        """Unmap everything and free the range (and the pool when this cache made it)."""
        with self._exclusive():
            if self._closed:
                return
            self._closed = True
            self._vt.close()
            self._staging.release()
            self._paused = None
            if self._spilled is not None:
                self._spilled.unlink(missing_ok=True)
                self._spilled = None
            if self._owns_pool:
                self.pool.close()

    def __enter__(self) -> "KVCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
