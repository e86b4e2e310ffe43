"""One llama.cpp context over a loaded model, shared by several sequences (slots).

The context has `n_slots` sequence ids over one unified KV cache of `n_ctx`
cells: any one sequence may grow to the whole context, and together they share
it. Each slot remembers which tokens its sequence holds in the cache (position
i = tokens[i]), so a request whose prompt starts with them (the next turn of a
conversation, the same system prompt) evaluates only what is new: `prepare`
keeps the longest common prefix, copied from whichever slot has it (a copy in
a unified cache shares the cells, it moves no data) or restored from the
conversations parked in host memory (prompt_cache.py: idle slots are parked
there, so their cells cost the running sequences' attention nothing). A batch
carries tokens of many sequences at once; `add` queues one, `decode` runs them all. Every
native call happens on the engine's single worker thread (worker.py).
Counting what is decoded here is what makes "no new prefill after resume"
measurable.
"""
from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp import _internals as internals

from engines.errors import ModelLoadError
from engines.llamacpp.prompt_cache import PromptCache, common_prefix

log = logging.getLogger(__name__)
NO_KV_SPACE = 1   # llama_decode's "could not find a KV slot for the batch" (nothing was decoded)


class KvFull(RuntimeError):
    """The batch did not fit the KV cache; the cache is unchanged."""


def kv_bytes_per_token(model: internals.LlamaModel) -> int:
    """K and V of one token over all layers, f16 (llama.cpp's default cache type)."""
    n_layer = llama_cpp.llama_model_n_layer(model.model)
    n_head = max(1, llama_cpp.llama_model_n_head(model.model))
    n_head_kv = llama_cpp.llama_model_n_head_kv(model.model)
    head_dim = llama_cpp.llama_model_n_embd(model.model) // n_head
    return n_layer * 2 * n_head_kv * head_dim * 2


@dataclass
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)   # what the KV cache holds for this sequence
    busy: bool = False
    last_used: float = 0.0


class Session:
    def __init__(self, model: internals.LlamaModel, params: llama_cpp.llama_context_params,
                 prompt_cache: PromptCache | None = None) -> None:
        try:
            self.ctx = internals.LlamaContext(model=model, params=params, verbose=False)
        except ValueError as exc:  # llama_init_from_model returned NULL (out of memory, bad params)
            raise ModelLoadError(f"llama.cpp could not create a context of {params.n_ctx} tokens: {exc}") from exc
        self.model = model
        self.prompt_cache = prompt_cache   # the engine's, outliving this context (pause, resume, growth)
        self.n_ctx = self.ctx.n_ctx()
        self.n_batch = int(params.n_batch)
        self.slots = [Slot(i) for i in range(int(params.n_seq_max))]
        self.batch = internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self._queued: list[tuple[Slot, int]] = []   # (slot, token) in the batch being built
        self._pending: dict[int, int] = {}          # seq id -> tokens of it in that batch
        self.num_evaluated = 0       # tokens decoded over this session's life (tests, benchmarks)

    # --- the slots ------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """KV cells in use (a prefix shared by two slots is counted twice: an upper bound)."""
        return sum(len(s.tokens) for s in self.slots)

    @property
    def free_cells(self) -> int:
        return self.n_ctx - self.num_tokens

    def free_slot(self) -> Slot | None:
        free = [s for s in self.slots if not s.busy]
        return min(free, key=lambda s: s.last_used) if free else None

    def prepare(self, prompt: list[int]) -> tuple[Slot, int] | None:
        """Take a free slot for prompt, with the longest cached prefix of it in place:
        from the slot itself, from another slot (perhaps busy), or from a conversation
        parked in host memory. Every other idle slot is parked (prompt_cache.py).
        Returns (slot, tokens already cached); None when every slot is busy. The last
        prompt token is always evaluated again, because sampling needs its logits."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        def common(slot: Slot) -> int:
            return min(common_prefix(slot.tokens, prompt), len(prompt) - 1)
        target = max(free, key=lambda s: (common(s), -s.last_used))
        source = max(self.slots, key=common)
        own = common(target)
        if 2 * own < len(target.tokens):   # a different conversation: keep it aside
            self._park(target)
        cached = self._reuse(target, source, own, common(source), prompt)
        for slot in free:
            if slot is not target and slot.tokens and self._park(slot):
                self.forget(slot)
        cached = self._restore(target, prompt, cached)
        target.busy = True
        target.last_used = time.monotonic()
        return target, cached

    def _reuse(self, target: Slot, source: Slot, own: int, best: int, prompt: list[int]) -> int:
        """Keep the target's own prefix, or share a longer one's cells from source."""
        if best > own:     # a copy in a unified cache shares the cells, it moves no data
            self.forget(target)
            self.ctx.kv_cache_seq_cp(source.seq_id, target.seq_id, 0, best)
            target.tokens = list(prompt[:best])
            return best
        self._cut(target, own)
        return len(target.tokens)

    def _cut(self, slot: Slot, keep: int) -> None:
        if keep < len(slot.tokens):
            if not self.ctx.kv_cache_seq_rm(slot.seq_id, keep, -1):
                self.forget(slot)
                return
            del slot.tokens[keep:]

    def _park(self, slot: Slot) -> bool:
        """Save an idle slot's conversation to the host cache; True when the cache holds
        it now (its cells may go). Without a cache, or for one larger than the cache's
        whole budget, False: it stays in its cells rather than be lost."""
        cache = self.prompt_cache
        if cache is None or cache.max_bytes <= 0 or not slot.tokens:
            return False
        return cache.covers(slot.tokens) or cache.park(slot.tokens, self.save_seq(slot))

    def _restore(self, target: Slot, prompt: list[int], cached: int) -> int:
        """Bring back a parked conversation into target when it holds more of prompt."""
        found = self.prompt_cache.best_for(prompt, cached) if self.prompt_cache is not None else None
        if found is None:
            return cached
        entry, keep = found
        self.forget(target)
        try:
            self.load_seq(target, entry.state, list(entry.tokens))
        except RuntimeError:   # no room for it: the prompt is evaluated instead
            log.warning("restoring a parked conversation of %d tokens failed; its prompt is re-read",
                        len(entry.tokens))
            self.forget(target)
            return 0
        self.prompt_cache.take(entry)
        self._cut(target, keep)
        return len(target.tokens)

    def release(self, slot: Slot) -> None:
        """The slot's request ended; its tokens stay cached for the next one."""
        slot.busy = False
        slot.last_used = time.monotonic()

    def forget(self, slot: Slot) -> None:
        self.ctx.kv_cache_seq_rm(slot.seq_id, 0, -1)
        slot.tokens.clear()

    def evict_idle(self) -> bool:
        """Free the least recently used idle slot's cells (its conversation parked in host
        memory first); False when none holds any."""
        idle = [s for s in self.slots if not s.busy and s.tokens]
        if not idle:
            return False
        oldest = min(idle, key=lambda s: s.last_used)
        self._park(oldest)   # kept in host memory where it can be; freed either way
        self.forget(oldest)
        return True

    # --- batches --------------------------------------------------------------------
    @property
    def batch_room(self) -> int:
        return self.n_batch - len(self._queued)

    def add(self, slot: Slot, token: int, logits: bool) -> int:
        """Queue one token of slot's sequence; returns its index in the batch (for sampling)."""
        b = self.batch.batch
        i = len(self._queued)
        b.token[i] = token
        pending = self._pending.get(slot.seq_id, 0)
        b.pos[i] = len(slot.tokens) + pending
        self._pending[slot.seq_id] = pending + 1
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = slot.seq_id
        b.logits[i] = logits
        self._queued.append((slot, token))
        return i

    def decode(self) -> int:
        """Decode every queued token. KvFull when the cache has no room (nothing changed)."""
        queued, self._queued = self._queued, []
        self._pending = {}
        if not queued:
            return 0
        self.batch.batch.n_tokens = len(queued)
        rc = llama_cpp.llama_decode(self.ctx.ctx, self.batch.batch)
        if rc == NO_KV_SPACE:
            raise KvFull(f"no room in the KV cache for {len(queued)} tokens")
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        for slot, token in queued:
            slot.tokens.append(token)
        self.num_evaluated += len(queued)
        return len(queued)

    def discard_batch(self) -> None:
        self._queued, self._pending = [], {}

    def clear(self) -> None:
        self.ctx.kv_cache_clear()
        for slot in self.slots:
            slot.tokens.clear()

    # --- per-sequence state (pause and resume) --------------------------------------
    def save_seq(self, slot: Slot) -> memoryview:
        """One sequence's KV cells in host memory (llama_state_seq_get_data), written once:
        the view keeps llama.cpp's copy, with no second one into bytes."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx.ctx, slot.seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx.ctx, buf, size, slot.seq_id)
        if written <= 0 or written > size:
            raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
        return memoryview(buf).cast("B")[:written]

    def load_seq(self, slot: Slot, state: bytes | memoryview, tokens: list[int]) -> None:
        array = ctypes.c_uint8 * len(state)
        buf = array.from_buffer(state) if isinstance(state, memoryview) else array.from_buffer_copy(state)
        read = llama_cpp.llama_state_seq_set_data(self.ctx.ctx, buf, len(state), slot.seq_id)
        if read != len(state):
            raise RuntimeError(f"llama_state_seq_set_data read {read} of {len(state)} bytes")
        slot.tokens = list(tokens)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
