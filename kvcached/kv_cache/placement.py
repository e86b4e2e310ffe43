"""Slot bookkeeping and fragmentation-aware slot choice, without torch.

A slot region is one part, or two where some layers slide (layout.py). Each
part's mapped pages are one range [floor, end): the layout grows a part from
its start and trims from its end, and only a sliding part's floor ever rises
(its old pages given back, kv_cache/window.py), so a slot is fully described by
whether it is live, how many tokens it holds, and each part's floor and end.

Placement: a new sequence takes a free slot whose pages are still mapped
before one that would need fresh pages, so a finished conversation's pages
are reused instead of mapping new ones while old ones sit idle. With a size
hint it takes the smallest mapped prefix that already covers the hint (best
fit), otherwise the largest one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvcached.errors import InvalidArgument, PoolExhausted


@dataclass
class PartPages:
    floor: int = 0    # pages [floor, end) of the part are mapped; floor > 0 only once
    end: int = 0      # a sliding part's old pages were given back


@dataclass
class SlotState:
    is_live: bool = False
    num_tokens: int = 0        # tokens [0, num_tokens) hold live KV
    parts: list[PartPages] = field(default_factory=lambda: [PartPages()])   # one per layout part
    kept_from: int = 0         # sliding layers' keys were written from this token on (an import)

    @property
    def mapped_pages(self) -> int:
        return sum(p.end - p.floor for p in self.parts)

    def clear_pages(self) -> None:
        """Nothing mapped and nothing given back (after a close or a lost pause)."""
        self.parts = [PartPages() for _ in self.parts]
        self.kept_from = 0


class SlotTable:
    """The state of every slot. Not thread-safe: the KV cache holds its lock."""

    def __init__(self, max_slots: int, num_parts: int = 1) -> None:
        if max_slots <= 0:
            raise InvalidArgument(f"max_slots: {max_slots} must be > 0")
        self.slots = [SlotState(parts=[PartPages() for _ in range(num_parts)]) for _ in range(max_slots)]

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

    def trimmable(self, part_pages) -> list[tuple[int, int, int, int]]:
        """(slot, part, first page within the part, count) of mapped pages holding no live
        token; part_pages(n) -> pages per part backing tokens [0, n)."""
        out = []
        for i, s in enumerate(self.slots):
            keeps = part_pages(s.num_tokens) if s.is_live else (0,) * len(s.parts)
            for j, (pages, keep) in enumerate(zip(s.parts, keeps)):
                first = max(keep, pages.floor) if s.is_live else pages.floor
                if pages.end > first:
                    out.append((i, j, first, pages.end - first))
        return out
