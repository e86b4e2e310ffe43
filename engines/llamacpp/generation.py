"""One request's generation as a sequence in the shared batch: its prompt still to read,
its own sampler, and the text it streams.

The batcher (batcher.py) feeds a sequence's tokens into the context's batches
and hands it the batch index of its logits; the sequence samples with its own
sampler chain (its temperature, seed, penalties), decides whether it stops,
and emits text. Text streams as UTF-8 is completed (a token may end mid-
character) and with stop strings held back (the client never sees a stop
string or a piece of one). It ends on an end-of-generation token, a stop token
or string, max_tokens, a full context (the session's, or the smaller one the
request asked for: Ollama num_ctx), its deadline (llama.vscode's
t_max_predict_ms; t_max_prompt_ms ends a prompt still being read with nothing),
or cancellation. A constraint (JSON schema or GBNF) runs as llama.cpp's grammar
sampler, first in the sequence's chain; asked-for logprobs ride on the chunks.
"""
from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp import _internals as internals

from engines.llamacpp.grammar import grammar_sampler
from engines.llamacpp.logprobs import token_logprob
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
    pending_logprobs: list = field(default_factory=list)

    def add(self, token: int, piece: bytes, logprob=None) -> None:
        self.pending_ids.append(token)
        if logprob is not None:
            self.pending_logprobs.append(logprob)
        text = self.matcher.feed(self.decoder.decode(piece))
        if text:
            self.emit(StreamChunk(text=text, token_ids=tuple(self.pending_ids),
                                  logprobs=tuple(self.pending_logprobs)))
            self.pending_ids.clear()
            self.pending_logprobs.clear()

    def finish(self, reason: FinishReason, usage: Usage) -> None:
        tail = "" if self.matcher.is_stopped else self.matcher.feed(self.decoder.decode(b"", final=True))
        text = tail + self.matcher.flush()
        self.emit(StreamChunk(text=text, token_ids=tuple(self.pending_ids), finish_reason=reason, usage=usage,
                              logprobs=tuple(self.pending_logprobs)))


class Sequence:
    """A request between admission and its last chunk. Worker thread only, except
    `request.cancelled`, which the client's side sets."""

    def __init__(self, request: GenerateRequest, prompt: list[int], emit: Emit, on_end: Callable[[], None],
                 vocab, n_ctx: int) -> None:
        """vocab: the model's (the grammar and logprobs read it); n_ctx: the context this
        request may fill (at most the session's)."""
        self.request = request
        self.prompt = prompt
        self.vocab = vocab
        self.n_ctx = n_ctx
        now = time.monotonic()
        self.prompt_deadline = now + request.prompt_deadline_s if request.prompt_deadline_s else None
        self.deadline = now + request.deadline_s if request.deadline_s else None
        self.emit = emit
        self._on_end = on_end
        self.out = _Output(emit=emit, matcher=StopMatcher(tuple(request.sampling.stop)))
        # Built here, on the caller's thread: a grammar llama.cpp cannot parse is a 400 at
        # once. A preempted sequence keeps its sampler (and its grammar's state).
        grammar = grammar_sampler(vocab, request.constraint) if request.constraint is not None else None
        self.sampler: internals.LlamaSampler | None = build_sampler(request.sampling, prompt, grammar)
        self.started = False             # admitted at least once
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

    @property
    def prompt_overdue(self) -> bool:
        """Its prompt is still being read past the prompt deadline: it ends with nothing."""
        return self.prompt_deadline is not None and not self.first_token_ns \
            and time.monotonic() > self.prompt_deadline

    def admit(self, slot: Slot, cached: int, load_ns: int) -> None:
        self.slot, self.load_ns = slot, self.load_ns + load_ns
        self.admitted_ns = self.admitted_ns or time.perf_counter_ns()
        if not self.started:         # first admission
            self.started = True
            self.cached = cached
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
        if self.prompt_overdue or self.request.sampling.max_tokens == 0:
            self.finish(FinishReason.LENGTH)
            return False
        if not self.first_token_ns:
            self.first_token_ns = time.perf_counter_ns()
        token = self.sampler.sample(session.ctx, index)
        self.num_generated += 1
        reason = self._stop_reason(session, token)
        if reason is None:
            self.out.add(token, token_piece(self.vocab, token), self._logprob(session, token, index))
            reason = self._length_reason(session)
        if reason is not None:
            self.finish(reason)
            return False
        self.to_eval = [token]     # its KV, and the logits of the next step
        return True

    def _logprob(self, session: Session, token: int, index: int):
        top_n = self.request.top_logprobs
        return token_logprob(session.ctx.ctx, self.vocab, token, top_n, index) if top_n >= 0 else None

    def _length_reason(self, session: Session) -> FinishReason | None:
        if self.out.matcher.is_stopped:
            return FinishReason.STOP
        full = len(self.slot.tokens) >= min(session.n_ctx, self.n_ctx)
        late = self.deadline is not None and time.monotonic() > self.deadline
        if full or late or self.num_generated >= self.request.sampling.max_tokens:
            return FinishReason.LENGTH
        return None

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
