"""A slot's tokens copied out and back in: the disk tier's input and output, and
what the sliding window left of them. A mixin of `KVCache` (manager.py), which
holds the state these methods read under its lock.

The copy is `[T, L, 2, H, D]` whatever the layout's parts, so a file written
before sliding layers had a part of their own reads back the same. Where a
slot's window moved, the sliding layers' tokens before its window floor are no
longer held: they read as zeros in the copy, and the floor travels beside it
(`window_floor`), so an import maps and fills only what was kept and the slot
answers `can_resume_at` as the exported one did; never a zero read as a key.
"""
from __future__ import annotations

import torch

from kvcached.kv_cache import window
from kvcached.kv_cache.layout import Part


class SlotCopy:
    """KVCache's copies of a slot's tokens (see the module docstring)."""

    def window_floor(self, slot: int) -> int:
        """The first token whose sliding layers' K and V the slot holds (0: every token)."""
        with self._cond:
            return window.window_floor(self.layout, self._table.live(slot))

    def can_resume_at(self, slot: int, n_tokens: int) -> bool:
        """Whether a sequence may continue at token n_tokens with the slot's KV (a prefix
        of n_tokens reused): false once the window moved past keys it would read."""
        with self._cond:
            return window.can_resume_at(self.layout, self._table.live(slot), n_tokens)

    def slot_tokens(self, slot: int, n_tokens: int) -> torch.Tensor:
        """A slot's first n_tokens, all layers, as one contiguous [T, L, 2, H, D] view
        (layouts of one part; see layout.slot_view)."""
        return self._view(self.layout.slot_view(slot, n_tokens))

    def export_slot(self, slot: int, n_tokens: int) -> torch.Tensor:
        """A host copy of a slot's first n_tokens ([T, L, 2, H, D]), live or paused: the
        disk tier's input. A paused slot's bytes come from the host copy the pause made.
        Sliding layers' tokens before `window_floor(slot)` are zeros."""
        with self._cond:
            state = self._table.live(slot)
            if n_tokens > state.num_tokens:
                raise ValueError(f"slot {slot} holds {state.num_tokens} tokens, not {n_tokens}")
            if self._paused is not None:
                self._unspill_locked()
            s = self.shape
            out = torch.zeros((n_tokens, s.num_layers, 2, s.num_kv_heads, s.head_dim), dtype=self.dtype)
            floor = window.window_floor(self.layout, state)
            for part, pages in zip(self.layout.parts, state.parts):
                first = floor if part.window else 0
                if first < n_tokens:
                    out[first:, list(part.layers)] = self._part_tokens(slot, part, pages.floor, first, n_tokens)
            return out

    def _part_tokens(self, slot: int, part: Part, floor: int, first: int, end: int) -> torch.Tensor:
        """Tokens [first, end) of one part of a slot on the host, [T, Lp, 2, H, D]."""
        view = self.layout.part_view(slot, part, first, end - first)
        if self._paused is None:
            return self._view(view).to("cpu", copy=True)
        # The pause copied the part from its floor page: that extent starts there.
        page_start = self.layout.part_first_page(slot, part) * self.layout.page_size
        extent = next(e for e in self._paused.extents if e.offset == page_start + floor * self.layout.page_size)
        skip = view.offset * self.shape.itemsize - extent.offset
        nbytes = (end - first) * part.token_elems * self.shape.itemsize
        host = self._staging.get(self._paused.span)[extent.at + skip:extent.at + skip + nbytes]
        return host.clone().view(self.dtype).reshape(view.size)

    def import_slot(self, slot: int, kv: torch.Tensor, window_floor: int = 0) -> None:
        """Make a slot hold this KV ([T, L, 2, H, D], as export_slot gave it, with the floor
        it gave): pages mapped for its T tokens (sliding layers' from the floor), bytes
        copied in. Resumes a paused cache (ensure does)."""
        n_tokens = kv.shape[0]
        s = self.shape
        if tuple(kv.shape[1:]) != (s.num_layers, 2, s.num_kv_heads, s.head_dim) or kv.dtype != self.dtype:
            raise ValueError(f"KV {tuple(kv.shape)} {kv.dtype} does not fit slots of "
                             f"[T, {s.num_layers}, 2, {s.num_kv_heads}, {s.head_dim}] {self.dtype}")
        with self._cond:
            self._ensure(slot, n_tokens, 0, keep_from=min(window_floor, n_tokens))
            floor = min(n_tokens, window.window_floor(self.layout, self._table.live(slot)))
            for part in self.layout.parts:
                first = floor if part.window else 0
                target = self._view(self.layout.part_view(slot, part, first, n_tokens - first))
                target.copy_(kv[first:, list(part.layers)])
            self.pool.backend.synchronize()
