"""Slot bookkeeping and fragmentation-aware slot choice, without torch.

Each slot's mapped pages are a prefix of its region (the layout grows a slot
from its start and trims from its end), so a slot is fully described by
three numbers: is it live, how many tokens it holds, how many pages are mapped.

Placement: a new sequence takes a free slot whose pages are still mapped
before one that would need fresh pages, so a finished conversation's pages
are reused instead of mapping new ones while old ones sit idle. With a size
hint it takes the smallest mapped prefix that already covers the hint (best
fit), otherwise the largest one.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvcached.errors import InvalidArgument, PoolExhausted


@dataclass
class SlotState:
    is_live: bool = False
    num_tokens: int = 0        # tokens [0, num_tokens) hold live KV
    mapped_pages: int = 0      # pages [0, mapped_pages) of the slot's region are mapped


class SlotTable:
    """The state of every slot. Not thread-safe: the KV cache holds its lock."""

    def __init__(self, max_slots: int) -> None:
        if max_slots <= 0:
            raise InvalidArgument(f"max_slots: {max_slots} must be > 0")
        self.slots = [SlotState() for _ in range(max_slots)]

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, slot: int) -> SlotState:
        if not isinstance(slot, int) or not 0 <= slot < len(self.slots):
            raise InvalidArgument(f"slot: {slot!r} is not in [0, {len(self.slots)})")
        return self.slots[slot]

    def live(self, slot: int) -> SlotState:
        state = self.get(slot)
        if not state.is_live:
            raise InvalidArgument(f"slot: {slot} is not acquired")
        return state

    def choose(self, prefer_mapped: bool = True, needed_pages: int | None = None) -> int:
        """The free slot a new sequence should take; PoolExhausted when all are live."""
        free = [i for i, s in enumerate(self.slots) if not s.is_live]
        if not free:
            raise PoolExhausted(f"all {len(self.slots)} KV slots are in use")
        pages = {i: self.slots[i].mapped_pages for i in free}
        if not prefer_mapped:
            return min(free, key=lambda i: (pages[i], i))
        if needed_pages is not None:
            covering = [i for i in free if pages[i] >= needed_pages]
            if covering:
                return min(covering, key=lambda i: (pages[i], i))
        return max(free, key=lambda i: (pages[i], -i))

    def acquire(self, slot: int) -> None:
        state = self.get(slot)
        assert not state.is_live, f"slot {slot} acquired twice"
        state.is_live = True
        state.num_tokens = 0

    def release(self, slot: int) -> None:
        state = self.live(slot)
        state.is_live = False
        state.num_tokens = 0

    def held_pages(self) -> int:
        return sum(s.mapped_pages for s in self.slots)

    def live_tokens(self) -> int:
        return sum(s.num_tokens for s in self.slots if s.is_live)

    def trimmable(self, pages_for_tokens) -> list[tuple[int, int, int]]:
        """(slot, first page within slot, count) of mapped pages holding no live token."""
        out = []
        for i, s in enumerate(self.slots):
            keep = pages_for_tokens(s.num_tokens) if s.is_live else 0
            if s.mapped_pages > keep:
                out.append((i, keep, s.mapped_pages - keep))
        return out
