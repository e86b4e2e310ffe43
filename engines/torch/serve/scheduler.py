"""Continuous batching over N slots: admission, chunked prefill, decode, cancellation.

Pure bookkeeping, no torch (CONVENTIONS 3), so every interleaving is tested
with hypothesis on the CPU. Each step the scheduler admits waiting sequences
into free slots (the prefix cache picks the slot and says how much of the
prompt is already computed there), hands out prefill chunks under a token
budget so a long prompt never stalls the decodes running beside it, and
decodes every sequence whose prompt is done. The runner computes; complete()
records what it sampled.

Memory: two hooks passed in (the engine's KVBudget, see
engines/torch/serve/kv_budget.py). `gate(seq, slot)` may refuse the head of the
queue its slot until memory frees; it then stays first in line (FIFO: a large
request is not starved by smaller ones behind it). `grow(seq)` is asked before
a running sequence decodes past the tokens its KV booking covers
(`booked_tokens`, set by the gate): refused, the sequence sits this step out
while the others decode. Without hooks everything is admitted.

Invariants (checked in tests): a slot runs at most one sequence; a running
sequence's computed tokens never exceed its tokens; a decoding sequence has
exactly one token not yet computed (the last one sampled); no position ever
reaches max_ctx.
"""
from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engines.errors import ContextOverflow, EngineBusy
from engines.torch.serve.prefix_cache import PrefixCache
from engines.torch.serve.token_history import TokenHistory
from engines.types import FinishReason


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    max_tokens: int
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SeqStatus = SeqStatus.WAITING
    slot: int = -1
    num_computed: int = 0      # tokens (prompt then output) whose KV is in the slot
    num_cached: int = 0        # prompt tokens reused from a held prefix, not computed
    output: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    open_ended: bool = False   # no max_tokens from the client: its KV is booked as it grows
    booked_tokens: int = 0     # tokens its KV booking covers (the budget's gate and grow set it)
    memory_wait_since: float | None = None   # time.monotonic() its memory (entry or growth) was refused

    @property
    def final_tokens(self) -> int:
        """Tokens it holds at most: the prompt and every token it may generate."""
        return len(self.prompt) + self.max_tokens

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def history(self) -> TokenHistory:
        """`tokens` without the copy (token_history.py): what sampling reads each step."""
        return TokenHistory(self.prompt, self.output)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < len(self.prompt)


@dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int  # prompt positions [start, end) computed in this step
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == len(self.seq.prompt)


@dataclass(frozen=True)
class StepPlan:
    prefills: tuple[PrefillChunk, ...] = ()
    decodes: tuple[Sequence, ...] = ()   # each feeds its last token at position num_computed

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    def sampling_sequences(self) -> list[Sequence]:
        """The sequences that get a new token from this step, in the runner's logits order."""
        return [c.seq for c in self.prefills if c.is_last] + list(self.decodes)


Gate = Callable[[Sequence, int], bool]   # (head of the queue, its slot) -> admitted
Grow = Callable[[Sequence], bool]        # (a running sequence past its booking) -> may decode


class Scheduler:
    def __init__(self, prefix_cache: PrefixCache, max_ctx: int, prefill_chunk: int = 512,
                 max_queue: int = 16, gate: Gate | None = None, grow: Grow | None = None) -> None:
        assert max_ctx >= 2 and prefill_chunk >= 1 and max_queue >= 0
        self.prefix_cache = prefix_cache
        self.gate = gate
        self.grow = grow
        self.max_ctx = max_ctx
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a sequence. Its max_tokens is cut to what the context can hold."""
        if not seq.prompt:
            raise ContextOverflow("the prompt is empty: at least one token is needed")
        if len(seq.prompt) >= self.max_ctx:
            raise ContextOverflow(
                f"the prompt has {len(seq.prompt)} tokens; the context holds {self.max_ctx} "
                "and one more is needed to answer")
        if len(self.waiting) >= self.max_queue:
            raise EngineBusy(f"{len(self.waiting)} requests are already waiting for this model")
        seq.max_tokens = min(seq.max_tokens, self.max_ctx - len(seq.prompt))
        if seq.max_tokens <= 0:
            seq.status, seq.finish_reason = SeqStatus.FINISHED, FinishReason.LENGTH
            return
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        self._admit()
        grow = self.grow   # a sequence past its booking decodes only if the booking grows
        decodes = tuple(s for s in self.running if not s.is_prefilling and
                        (grow is None or s.num_computed < s.booked_tokens or grow(s)))
        prefills, budget = [], self.prefill_chunk
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                n = min(len(seq.prompt) - seq.num_computed, budget)
                prefills.append(PrefillChunk(seq, seq.num_computed, seq.num_computed + n))
                budget -= n
        return StepPlan(tuple(prefills), decodes)

    def next_placements(self) -> list[tuple[Sequence, int]]:
        """The waiting sequences that free slots would take now, in order, with their
        slots (what admission must find memory for). Changes nothing."""
        out: list[tuple[Sequence, int]] = []
        for seq in self.waiting:
            picked = self.prefix_cache.choose(seq.prompt, exclude={slot for _, slot in out})
            if picked is None:
                break
            out.append((seq, picked[0]))
        return out

    def _admit(self) -> None:
        while self.waiting:
            head = self.waiting[0]
            picked = self.prefix_cache.choose(head.prompt)
            if picked is None:
                return
            if self.gate is not None and not self.gate(head, picked[0]):
                return   # no memory for it yet: it stays first in line
            self.prefix_cache.take(picked[0], head.prompt, picked[1])
            seq = self.waiting.popleft()
            seq.slot, seq.num_computed = picked
            seq.num_cached = seq.num_computed
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)

    def complete(self, plan: StepPlan, sampled: list[int]) -> list[Sequence]:
        """Record a step: sampled[i] is the new token of plan.sampling_sequences()[i].
        Returns the sequences that got a token (the caller checks stops and
        calls finish); those that reached max_tokens are finished here."""
        for chunk in plan.prefills:
            chunk.seq.num_computed = chunk.end
        for seq in plan.decodes:
            seq.num_computed += 1
        got = plan.sampling_sequences()
        assert len(got) == len(sampled), "one sampled token per sequence that samples"
        for seq, token in zip(got, sampled):
            if seq.status is not SeqStatus.RUNNING:
                continue  # cancelled while the step ran
            seq.output.append(token)
            if len(seq.output) >= seq.max_tokens:
                self.finish(seq, FinishReason.LENGTH)
        return got

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence; its slot keeps the computed KV as a reusable prefix."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.prefix_cache.release(seq.slot, seq.tokens[:seq.num_computed])
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    def cancel(self, seq: Sequence) -> None:
        self.finish(seq, FinishReason.CANCELLED)
