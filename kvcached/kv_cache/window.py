"""Sliding-window giveback: which pages of a slot to map and unmap as it grows.

No torch (CONVENTIONS 3): the manager turns a `PagePlan` into map and unmap
calls on its virtual tensor. A slot region is one or two parts (layout.py);
each part's mapped pages are one range [floor, end) (placement.PartPages).

The rule. A token at position p of a sliding layer reads keys p - window + 1
.. p, so a step that starts at token `start` (a prefill chunk or a decode)
never reads a sliding key below start - window + 1. Growing a slot from
`start`, the pages of a sliding part that hold only tokens < start - window
(the part's window is its layers' largest) are given back: its floor rises.
The global part's floor never moves. A slot can continue at token `start` only
if it still holds the keys [start - window, start): `can_resume_at`. A step
from token 0 needs no old key: a new sequence in the slot starts its sliding
part afresh (the old range, which holds nothing it reads, is given back).

Pages above the live tokens stay mapped on a shrink, as they always did, until
trim takes them (placement.SlotTable.trimmable).
"""
from __future__ import annotations

from dataclasses import dataclass

from kvcached.errors import InvalidArgument, WindowMoved
from kvcached.kv_cache.layout import KVLayout, Part, ceil_div
from kvcached.kv_cache.placement import PartPages, SlotState

Span = tuple[int, int]   # (first page in the whole cache range, count)


@dataclass(frozen=True)
class PagePlan:
    """What an ensure does to a slot's pages: map these spans, then unmap those."""
    map: tuple[Span, ...]
    unmap: tuple[Span, ...]
    parts: tuple[PartPages, ...]   # the slot's part ranges once done
    kept_from: int                 # and its SlotState.kept_from


def part_token_bytes(layout: KVLayout, part: Part) -> int:
    return part.token_elems * layout.shape.itemsize


def first_whole_token(layout: KVLayout, part: Part, floor: int) -> int:
    """The first token whose bytes all lie at or above page `floor` of the part."""
    return ceil_div(floor * layout.page_size, part_token_bytes(layout, part))


def window_floor(layout: KVLayout, state: SlotState) -> int:
    """The first token whose sliding layers' K and V the slot still holds (0: none given back)."""
    return max((max(state.kept_from, first_whole_token(layout, part, pages.floor))
                for part, pages in zip(layout.parts, state.parts) if part.window), default=0)


def max_window(layout: KVLayout) -> int:
    return max((part.window for part in layout.parts), default=0)


def can_resume_at(layout: KVLayout, state: SlotState, start: int) -> bool:
    """Whether a step may start at token `start` with what the slot holds: from 0
    always; else every sliding key it reads, [start - window, start), is still there."""
    floor = window_floor(layout, state)
    return start == 0 or floor == 0 or start - max_window(layout) >= floor


def releasable_floor(layout: KVLayout, part: Part, start: int) -> int:
    """Pages [0, result) of a sliding part hold only tokens < start - window."""
    cut = start - part.window
    return cut * part_token_bytes(layout, part) // layout.page_size if cut > 0 else 0


def plan_ensure(layout: KVLayout, slot: int, state: SlotState, n_tokens: int, start: int,
                keep_from: int = 0) -> PagePlan:
    """The pages for tokens [0, n_tokens) of a step starting at `start`. keep_from (with
    start 0 only): the first token whose sliding keys will be written (import_slot); the
    page holding its first byte is mapped, and window_floor says keep_from, not that page."""
    if not 0 <= start <= min(n_tokens, state.num_tokens):
        raise InvalidArgument(f"start: {start} is not in [0, min({n_tokens}, {state.num_tokens})]")
    if not can_resume_at(layout, state, start):
        raise WindowMoved(f"slot {slot} holds sliding keys from token {window_floor(layout, state)}; "
                          f"a step at token {start} reads {max_window(layout)} before it")
    maps, unmaps, parts = [], [], []
    for part, pages, need in zip(layout.parts, state.parts, layout.part_pages(n_tokens)):
        base = layout.part_first_page(slot, part)
        if part.window and start == 0:
            new, to_map, to_unmap = _restart(pages, need,
                                             keep_from * part_token_bytes(layout, part) // layout.page_size)
            maps += [(base + first, count) for first, count in to_map]
            unmaps += [(base + first, count) for first, count in to_unmap]
        else:
            floor = max(pages.floor, releasable_floor(layout, part, start)) if part.window else 0
            new = PartPages(floor, max(pages.end, need))
            maps += _span(base, pages.end, need)
            unmaps += _span(base, pages.floor, floor)
        parts.append(new)
    return PagePlan(tuple(maps), tuple(unmaps), tuple(parts), keep_from if start == 0 else state.kept_from)


def _span(base: int, first: int, end: int) -> list[Span]:
    return [(base + first, end - first)] if end > first else []


def _restart(old: PartPages, need: int, floor: int) -> tuple[PartPages, list[Span], list[Span]]:
    """A sliding part written afresh from token 0, keys below page `floor` never written:
    (its range, spans to map, spans to unmap), relative to the part. Old pages above the
    floor that touch the new range stay (as a shrink keeps them, for trim), the rest go,
    so the range stays one; every span to map is unmapped now (a failed map undoes
    exactly what it mapped)."""
    end = max(floor, need)
    below = _span(0, old.floor, min(old.end, floor))
    rest = max(old.floor, floor)
    if old.end <= rest:                       # nothing of the old range above the floor
        return PartPages(floor, end), _span(0, floor, end), below
    if rest <= end:                           # it touches [floor, need): keep it
        return PartPages(floor, max(end, old.end)), _span(0, floor, rest) + _span(0, old.end, need), below
    return PartPages(floor, end), _span(0, floor, end), below + _span(0, rest, old.end)


def live_extents(layout: KVLayout, slot: int, state: SlotState, n_tokens: int) -> list[Span]:
    """(byte offset, nbytes) of the bytes a slot's first n_tokens keep, a part each:
    what a pause copies and a resume maps back (never a page given back)."""
    out = []
    for part, pages in zip(layout.parts, state.parts):
        start = layout.part_first_page(slot, part) * layout.page_size
        skip = pages.floor * layout.page_size
        nbytes = n_tokens * part_token_bytes(layout, part) - skip
        if nbytes > 0:
            out.append((start + skip, nbytes))
    return out


def kept_bytes(layout: KVLayout, state: SlotState) -> int:
    """Bytes of K and V the slot's live tokens keep (the sliding part from its floor)."""
    total, floor = 0, window_floor(layout, state)
    for part in layout.parts:
        first = floor if part.window else 0
        total += max(0, state.num_tokens - first) * part_token_bytes(layout, part)
    return total


def pages_after_resume(layout: KVLayout, state: SlotState) -> list[PartPages]:
    """A slot's part ranges once a resume mapped its live extents back."""
    if not state.is_live:
        return [PartPages() for _ in state.parts]
    return [PartPages(p.floor, max(p.floor, need))
            for p, need in zip(state.parts, layout.part_pages(state.num_tokens))]
