"""Idle conversations parked in host memory, so they cost the running ones nothing.

The context's KV is one unified pool, and llama.cpp's attention walks every
used cell of it for every token it computes, other sequences' cells included
(masked, but still visited). Slots that keep their conversations cached while
idle therefore slow every prompt and every answer that comes after them: on
the bundled model with 8 slots' worth of cached 600-token conversations a new
512-token prompt read at ~250 tok/s against ~300 on an empty pool.

So, as llama-server does (`--cache-idle-slots` with `--cache-ram`), when a
slot takes a new request every other idle slot's sequence is saved to host
memory (`llama_state_seq_get_data`) and its cells are freed; a later prompt
that starts with a parked conversation's tokens gets it back into its slot
(`llama_state_seq_set_data`): a copy instead of a prefill. Matching is by the
tokens themselves, so a restore never brings an unrelated conversation back.
The parked bytes are bounded (`llama_prompt_cache_bytes`, oldest dropped
first), show in the model's memory report, and the broker's drop_prefixes
empties them. Pure bookkeeping here; session.py does the native calls.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Restoring copies a parked conversation's whole state, then cuts it at the common
# prefix; it pays when the prefix it saves is at least this fraction of what it copies.
# Copying a token's KV is ~1 us (host memcpy or PCIe) and evaluating it ~40 us
# (an 8B prompt on a GPU) to ~4 ms (the bundled model on 2 cores): 1/16 has margin.
MIN_GAIN_FRACTION = 1 / 16


@dataclass
class ParkedPrompt:
    tokens: tuple[int, ...]
    state: bytes | memoryview   # a sequence's cells, as Session.save_seq returns them
    parked_at: float = field(default_factory=time.monotonic)


def common_prefix(a: tuple[int, ...] | list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """Parked conversations, newest last, within a byte budget. Worker thread only,
    except the read-only counters (memory reports)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: list[ParkedPrompt] = []
        self.restored = 0      # conversations brought back (tests, logs)

    @property
    def host_bytes(self) -> int:
        return sum(len(e.state) for e in list(self._entries))

    @property
    def num_prompts(self) -> int:
        return len(self._entries)

    def covers(self, tokens: list[int]) -> bool:
        """A parked conversation already holds these tokens (a longer one restores them)."""
        return any(common_prefix(e.tokens, tokens) == len(tokens) for e in self._entries)

    def park(self, tokens: list[int], state: bytes | memoryview) -> bool:
        """Keep a conversation (False: it is larger than the whole budget); one it extends
        is dropped, the oldest go while over budget."""
        if len(state) > self.max_bytes:
            log.info("a cached conversation of %d tokens (%d MiB) is over the prompt cache's %d MiB "
                     "(prompt_cache_bytes); it is not parked", len(tokens), len(state) >> 20, self.max_bytes >> 20)
            return False
        self._entries = [e for e in self._entries if common_prefix(e.tokens, tokens) < len(e.tokens)]
        self._entries.append(ParkedPrompt(tuple(tokens), state))
        while self.host_bytes > self.max_bytes:
            self._entries.pop(0)
        return True

    def best_for(self, prompt: list[int], cached: int) -> tuple[ParkedPrompt, int] | None:
        """The parked conversation worth restoring for prompt, with the tokens of it that
        stay (at most all but the prompt's last, which is evaluated for its logits), when
        it saves more than `cached` (what the slots already give) by enough to pay its copy."""
        best: tuple[ParkedPrompt, int] | None = None
        for entry in self._entries:
            keep = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
            gain = keep - cached
            if gain > 0 and gain >= MIN_GAIN_FRACTION * len(entry.tokens) and (best is None or keep > best[1]):
                best = (entry, keep)
        return best

    def take(self, entry: ParkedPrompt) -> None:
        self._entries.remove(entry)
        self.restored += 1

    def clear(self) -> int:
        freed = self.host_bytes
        self._entries = []
        return freed
