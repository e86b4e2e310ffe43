"""One request's generation as a sequence in the shared batch: its prompt still to read,
its own sampler, and the text it streams.

The batcher (batcher.py) feeds a sequence's tokens into the context's batches
and hands it the batch index of its logits; the sequence samples with its own
sampler chain (its temperature, seed, penalties), decides whether it stops,
and emits text. Text streams as UTF-8 is completed (a token may end mid-
character) and with stop strings held back (the client never sees a stop
string or a piece of one). It ends on an end-of-generation token, a stop token
or string, max_tokens, a full context, or cancellation.
"""
from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp import _internals as internals

from engines.llamacpp.native import token_piece
from engines.llamacpp.sampling import build_sampler
from engines.llamacpp.session import Session, Slot
from engines.torch.serve.stops import StopMatcher
from engines.types import FinishReason, GenerateRequest, StreamChunk, Usage

Emit = Callable[[object], None]   # a StreamChunk, or an exception that ends the stream


@dataclass
class _Output:
    """Turns sampled tokens into the chunks the client sees."""
    emit: Emit
    matcher: StopMatcher
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    pending_ids: list[int] = field(default_factory=list)

    def add(self, token: int, piece: bytes) -> None:
        self.pending_ids.append(token)
        text = self.matcher.feed(self.decoder.decode(piece))
        if text:
            self.emit(StreamChunk(text=text, token_ids=tuple(self.pending_ids)))
            self.pending_ids.clear()

    def finish(self, reason: FinishReason, usage: Usage) -> None:
        tail = "" if self.matcher.is_stopped else self.matcher.feed(self.decoder.decode(b"", final=True))
        text = tail + self.matcher.flush()
        self.emit(StreamChunk(text=text, token_ids=tuple(self.pending_ids), finish_reason=reason, usage=usage))


class Sequence:
    """A request between admission and its last chunk. Worker thread only, except
    `request.cancelled`, which the client's side sets."""

    def __init__(self, request: GenerateRequest, prompt: list[int], emit: Emit, on_end: Callable[[], None]) -> None:
        self.request = request
        self.prompt = prompt
        self.emit = emit
        self._on_end = on_end
        self.out = _Output(emit=emit, matcher=StopMatcher(tuple(request.sampling.stop)))
        self.sampler: internals.LlamaSampler | None = None
        self.slot: Slot | None = None
        self.to_eval: list[int] = []     # tokens to decode next: the prompt's rest, or the last sampled one
        self.history: list[int] = []     # what the slot's KV should hold (checked after a resume)
        self.cached = 0
        self.num_generated = 0
        self.load_ns = 0
        self.admitted_ns = 0
        self.first_token_ns = 0
        self.ended = False

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled.is_set()

    def admit(self, slot: Slot, cached: int, load_ns: int) -> None:
        self.slot, self.load_ns = slot, self.load_ns + load_ns
        self.admitted_ns = self.admitted_ns or time.perf_counter_ns()
        if self.sampler is None:     # first admission (a preempted sequence keeps its sampler)
            self.cached = cached
            self.sampler = build_sampler(self.request.sampling, self.prompt)
            self.to_eval = self.prompt[cached:]
            self.history = list(self.prompt[:cached])
        else:
            self.to_eval = self.history[cached:] + self.to_eval
            del self.history[cached:]

    def preempt(self) -> None:
        """Out of the context, back to the queue; on readmission it re-reads what it held."""
        self.slot = None

    def queue_tokens(self, session: Session, room: int) -> int | None:
        """Put up to room of this sequence's next tokens in the batch; the batch index of
        the logits it will sample from when this chunk ends its prompt, else None."""
        assert self.slot is not None
        chunk = self.to_eval[:room]
        last = len(chunk) == len(self.to_eval)
        index = None
        for i, token in enumerate(chunk):
            index = session.add(self.slot, token, logits=last and i == len(chunk) - 1)
        self.history.extend(chunk)
        del self.to_eval[:len(chunk)]
        return index if last else None

    def unqueue(self, count: int) -> None:
        """The batch was not decoded: put its last `count` tokens back."""
        if count:
            self.to_eval[:0] = self.history[-count:]
            del self.history[-count:]

    def sample(self, session: Session, index: int) -> bool:
        """Sample the next token from the batch's logits at index; False when the sequence ended."""
        assert self.sampler is not None and self.slot is not None
        if not self.first_token_ns:
            self.first_token_ns = time.perf_counter_ns()
        if self.request.sampling.max_tokens == 0:
            self.finish(FinishReason.LENGTH)
            return False
        token = self.sampler.sample(session.ctx, index)
        self.num_generated += 1
        reason = self._stop_reason(session, token)
        if reason is None:
            self.out.add(token, token_piece(session.model.vocab, token))
            if self.out.matcher.is_stopped:
                reason = FinishReason.STOP
            elif len(self.slot.tokens) >= session.n_ctx:
                reason = FinishReason.LENGTH
            elif self.num_generated >= self.request.sampling.max_tokens:
                reason = FinishReason.LENGTH
        if reason is not None:
            self.finish(reason)
            return False
        self.to_eval = [token]     # its KV, and the logits of the next step
        return True

    def _stop_reason(self, session: Session, token: int) -> FinishReason | None:
        params = self.request.sampling
        if not params.ignore_eos and llama_cpp.llama_vocab_is_eog(session.model.vocab, token):
            return FinishReason.STOP
        if token in params.stop_token_ids:
            return FinishReason.STOP
        return None

    def finish(self, reason: FinishReason) -> None:
        if self.ended:
            return
        now = time.perf_counter_ns()
        first = self.first_token_ns or now
        usage = Usage(prompt_tokens=len(self.prompt), completion_tokens=self.num_generated,
                      cached_tokens=self.cached, prompt_eval_ns=first - (self.admitted_ns or first),
                      eval_ns=now - first, load_ns=self.load_ns)
        self.out.finish(reason, usage)
        self._end()

    def fail(self, exc: BaseException) -> None:
        if not self.ended:
            self.emit(exc)
            self._end()

    def _end(self) -> None:
        self.ended = True
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        self._on_end()
