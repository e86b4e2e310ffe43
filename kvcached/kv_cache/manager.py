"""KVCache: one model's K and V in a virtual tensor, mapped page by page.

The layout (see layout.py) is token-major slot regions: slot s is
`[max_context, L, 2, H_kv, D]` at a fixed, page-aligned stride, so a sequence
grows from its slot's start one page at a time, one page holds every layer of
many tokens, and each layer's K or V is a strided view attention reads
without a copy. Sliding-window layers sit in a part of their own, whose pages
behind the window are given back as the slot grows (window.py). The engine's use:

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
from kvcached.errors import KVFileRejected, WindowMoved
from kvcached.kv_cache import offload, spill_file, window
from kvcached.kv_cache.layout import KVLayout, KVShape, dtype_name
from kvcached.kv_cache.placement import SlotTable
from kvcached.kv_cache.slot_copy import SlotCopy
from kvcached.page_pool import PagePool
from kvcached.virtual_tensor import VirtualTensor
from kvcached.vmm.backend import VmmBackend

log = logging.getLogger(__name__)

RESUME_CHUNK = 256 << 20   # bytes mapped per step of resume while the previous copy runs
PAUSE_CHUNK = 256 << 20    # bytes copied per step of pause while the previous chunk is unmapped


class KVCache(SlotCopy):
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
        self._table = SlotTable(max_slots, len(self.layout.parts))
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
        state = self._table.slots[slot]
        keep = dict(window.live_extents(self.layout, slot, state, n_tokens))   # offset -> bytes
        start = self.layout.first_page(slot) * self.layout.page_size
        extents = []
        for e in self._paused.extents:
            if not start <= e.offset < start + self.layout.slot_bytes:
                extents.append(e)
            elif keep.get(e.offset):
                extents.append(offload.Extent(e.offset, min(e.nbytes, keep[e.offset]), e.at))
        self._paused = offload.PausedKV(tuple(extents))

    def ensure(self, slot: int, n_tokens: int, start: int | None = None) -> int:
        """Back tokens [0, n_tokens) of a slot with pages; they become its live tokens.
        start: the first token the coming step writes (default: the live length, or
        n_tokens on a shrink); sliding layers' pages wholly before start - window go back
        to the pool (window.py), and WindowMoved says the slot lacks keys a step at start
        reads. Returns bytes newly mapped. PoolExhausted/DeviceOutOfMemory leave it as it was."""
        return self._ensure(slot, n_tokens, start)

    def _ensure(self, slot: int, n_tokens: int, start: int | None, keep_from: int = 0) -> int:
        with self._cond:
            state = self._table.live(slot)
            self.layout.check_tokens(n_tokens)
            start = min(state.num_tokens, n_tokens) if start is None else start
            if self._paused is not None:
                if start == n_tokens <= state.num_tokens:   # shrinking needs no pages: stay paused
                    self._shrink_paused(slot, n_tokens)
                    return 0
                self._resume_locked()
            plan = window.plan_ensure(self.layout, slot, state, n_tokens, start, keep_from)
            mapped = self._apply(plan)
            state.parts, state.num_tokens, state.kept_from = list(plan.parts), n_tokens, plan.kept_from
            return mapped

    def _shrink_paused(self, slot: int, n_tokens: int) -> None:
        state = self._table.slots[slot]
        if not window.can_resume_at(self.layout, state, n_tokens):
            raise WindowMoved(f"slot {slot}: sliding keys before token {n_tokens} were given back")
        self._truncate_paused(slot, n_tokens)
        if not n_tokens:
            state.clear_pages()   # nothing paused for it: a resume maps nothing there
        state.num_tokens = n_tokens

    def _apply(self, plan: window.PagePlan) -> int:
        """Map the plan's spans (all or nothing), then give back the window's old pages."""
        if plan.map and self.tail_readers:
            # A kernel still reading the zero page there (a batched decode over a
            # read-length bucket reads every slot's tail) must finish before the
            # mapping changes. Where no kernel reads past live tokens, none can be
            # there: the device-wide sync is skipped, and with it a stall of every
            # thread's CUDA calls until the GPU drains (three models in one daemon:
            # steps of 37 ms instead of ~5).
            self.pool.backend.synchronize()
        mapped, done = 0, []
        try:
            for first, count in plan.map:
                mapped += self._vt.map_pages(first, count)
                done.append((first, count))
        except BaseException:
            self._vt.unmap_spans(done)   # every span mapped was unmapped before
            raise
        if plan.unmap:   # the virtual tensor synchronizes once before it unmaps
            self._vt.unmap_spans(plan.unmap)
        return mapped

    def num_tokens(self, slot: int) -> int:
        with self._cond:
            return self._table.live(slot).num_tokens

    # --- views ---------------------------------------------------------------
    def layer_kv(self, slot: int, layer: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's K and V for one layer: two [H, T, D] views, last dim contiguous."""
        return (self._view(self.layout.layer_view(slot, layer, n_tokens, False)),
                self._view(self.layout.layer_view(slot, layer, n_tokens, True)))

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
            trimmable = self._table.trimmable(self.layout.part_pages)
            parts = self.layout.parts
            # step_guard ends when a step's kernels are queued, not done: a batched
            # decode may still read these pages. The virtual tensor synchronizes once
            # for all the spans (one cuCtxSynchronize a trim, not one a slot).
            freed = self._vt.unmap_spans([(self.layout.part_first_page(slot, parts[part]) + first, count)
                                          for slot, part, first, count in trimmable])
            for slot, part, first, _ in trimmable:
                state = self._table.slots[slot]
                state.parts[part].end = first
                if not state.is_live:   # a freed slot starts afresh
                    state.parts[part].floor = state.parts[part].end = state.kept_from = 0
            self._shrink_own_pool()
            return freed

    def pause(self) -> int:
        """Copy live KV to host memory and unmap every page; returns bytes unmapped.
        Idempotent: a paused cache returns 0."""
        with self._exclusive():
            if self._paused is not None:
                return 0
            ranges = [extent for i, s in enumerate(self._table.slots) if s.is_live
                      for extent in window.live_extents(self.layout, i, s, s.num_tokens)]
            page = self.layout.page_size

            def unmap(offset: int, nbytes: int) -> int:
                first = offset // page
                return self._vt.unmap_pages(first, -(-(offset + nbytes) // page) - first)

            # Whatever the engine queued must land before its bytes are copied.
            self.pool.backend.synchronize()
            # Whole pages a chunk: unmapping a chunk must never take bytes of the next.
            chunk = max(1, PAUSE_CHUNK // page) * page
            paused, freed = offload.save_unmapping(self._bytes, ranges, self._staging, unmap, chunk)
            rest = [(self.layout.part_first_page(i, part) + p.floor, p.end - p.floor)   # past the live tokens
                    for i, s in enumerate(self._table.slots) for part, p in zip(self.layout.parts, s.parts)]
            freed += self._vt.unmap_spans(rest)
            for s in self._table.slots:
                for p in s.parts:   # nothing mapped; a floor stays: resume maps from it
                    p.end = p.floor
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
        for s in self._table.slots:
            s.parts = window.pages_after_resume(self.layout, s)
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
            return sum(window.kept_bytes(self.layout, s) for s in self._table.slots if s.is_live)

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
                state.num_tokens = 0
                state.clear_pages()
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
