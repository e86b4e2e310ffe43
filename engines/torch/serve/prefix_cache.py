"""Which slot a new request runs in, and how much of its prompt's KV is already there.

A finished sequence keeps its slot's KV: the next turn of a chat, a shared
system prompt or an editor re-sending the same file starts with the same
tokens, so a new request goes to the free slot whose held tokens share the
longest prefix with its prompt and skips recomputing that prefix. Slots with no
useful prefix are handed out empty first, then least recently used. Dropping
the cached prefixes (the broker's third reclaim step) forgets every idle slot's
tokens so its KV pages can be freed. A slot whose sliding-window layers gave
back keys a prefix's continuation reads (`can_resume_at`, the KV store's
answer) offers no prefix there: the prompt is recomputed, never attended over
missing keys. Pure bookkeeping, no torch.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Collection
from dataclasses import dataclass, field


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class SlotState:
    tokens: list[int] = field(default_factory=list)  # tokens whose KV this slot holds, in order
    is_running: bool = False
    last_used: int = 0                                # a logical clock: larger is more recent


class PrefixCache:
    def __init__(self, num_slots: int, min_reuse: int = 1,
                 can_resume_at: Callable[[int, int], bool] | None = None) -> None:
        assert num_slots >= 1
        self.slots = [SlotState() for _ in range(num_slots)]
        self.min_reuse = min_reuse
        self.can_resume_at = can_resume_at   # (slot, prefix length) -> its KV still serves it
        self._clock = itertools.count(1)

    def acquire(self, prompt: list[int]) -> tuple[int, int] | None:
        """A free slot for this prompt and the number of prompt tokens whose KV it
        already holds; None when every slot is running. At least one prompt token
        is always left to compute, since its logits pick the first new token."""
        picked = self.choose(prompt)
        if picked is not None:
            self.take(picked[0], prompt, picked[1])
        return picked

    def choose(self, prompt: list[int], exclude: Collection[int] = ()) -> tuple[int, int] | None:
        """What acquire would pick, without taking it (admission weighs its memory
        first). `exclude`: slots already chosen for earlier prompts of a batch."""
        free = [i for i, s in enumerate(self.slots) if not s.is_running and i not in exclude]
        if not free:
            return None
        scored = [(self._usable(i, min(common_prefix_len(self.slots[i].tokens, prompt),
                                       max(len(prompt) - 1, 0))), i) for i in free]
        reuse, slot = max(scored, key=lambda t: (t[0], -self.slots[t[1]].last_used))
        if reuse < self.min_reuse:
            # No useful prefix: take an empty slot, else the least recently used one,
            # so the prefixes most likely to be asked for again survive longest.
            slot = min(free, key=lambda i: (bool(self.slots[i].tokens), self.slots[i].last_used))
            reuse = 0
        return slot, reuse

    def _usable(self, slot: int, reuse: int) -> int:
        """reuse, or 0 where the slot's window moved past keys a continuation at reuse reads
        (no shorter prefix helps: it would read further back still)."""
        if reuse and self.can_resume_at is not None and not self.can_resume_at(slot, reuse):
            return 0
        return reuse

    def take(self, slot: int, prompt: list[int], reuse: int) -> None:
        """Run a sequence in slot, reusing the first `reuse` prompt tokens held there."""
        state = self.slots[slot]
        assert not state.is_running, f"slot {slot} is already running"
        state.is_running = True
        state.tokens = list(prompt[:reuse])
        state.last_used = next(self._clock)

    def release(self, slot: int, tokens: list[int]) -> None:
        """The sequence in this slot ended; its KV holds these tokens (those computed)."""
        state = self.slots[slot]
        assert state.is_running, f"slot {slot} was not running"
        state.is_running = False
        state.tokens = list(tokens)
        state.last_used = next(self._clock)

    def hold(self, slot: int, tokens: list[int]) -> None:
        """An idle slot holds these tokens' KV (restored from disk): reusable as a prefix."""
        state = self.slots[slot]
        assert not state.is_running, f"slot {slot} is running"
        state.tokens = list(tokens)
        state.last_used = next(self._clock)

    def forget(self, slot: int) -> None:
        """The slot's KV was lost or freed: hold no prefix there."""
        self.slots[slot].tokens = []

    def drop_all(self) -> list[int]:
        """Forget every idle slot's prefix; returns the slots that held one."""
        dropped = [i for i, s in enumerate(self.slots) if not s.is_running and s.tokens]
        for i in dropped:
            self.slots[i].tokens = []
        return dropped

    def empty_slot(self) -> int | None:
        """A slot neither running nor holding a prefix (free to scribble on), or None."""
        return next((i for i, s in enumerate(self.slots) if not s.is_running and not s.tokens), None)

    def held_tokens(self, slot: int) -> int:
        return len(self.slots[slot].tokens)

    @property
    def num_running(self) -> int:
        return sum(s.is_running for s in self.slots)
