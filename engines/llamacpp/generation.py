"""One generation on a llama.cpp session: prefill what is new, then sample, stream, stop.

Runs on the engine's worker thread. Text streams as UTF-8 is completed (a
token may end mid-character) and with stop strings held back (the client
never sees a stop string or a piece of one). It ends on an end-of-generation
token, a stop token or string, max_tokens, a full context (the session's, or
the smaller one the request asked for: Ollama num_ctx), its deadline
(llama.vscode's t_max_predict_ms), or cancellation. A constraint (JSON schema
or GBNF) runs as llama.cpp's grammar sampler; asked-for logprobs ride on the
chunks.
"""
from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import llama_cpp

from engines.llamacpp.grammar import grammar_sampler
from engines.llamacpp.logprobs import token_logprob
from engines.llamacpp.native import token_piece
from engines.llamacpp.sampling import build_sampler
from engines.llamacpp.session import Session
from engines.torch.serve.stops import StopMatcher
from engines.types import FinishReason, GenerateRequest, StreamChunk, Usage

Emit = Callable[[StreamChunk], None]


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


@dataclass
class _Until:
    """What Session.decode polls between batches: cancelled, or past the prompt deadline."""
    request: GenerateRequest
    deadline: float | None

    def is_set(self) -> bool:
        return self.request.cancelled.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)


def _stop_reason(session: Session, token: int, request: GenerateRequest) -> FinishReason | None:
    params = request.sampling
    if not params.ignore_eos and llama_cpp.llama_vocab_is_eog(session.model.vocab, token):
        return FinishReason.STOP
    if token in params.stop_token_ids:
        return FinishReason.STOP
    return None


def run_generation(session: Session, request: GenerateRequest, prompt: list[int], emit: Emit,
                   load_ns: int = 0) -> None:
    """Generate for request on session, emitting chunks; the last carries finish_reason and usage.
    load_ns: time this request waited for a load or resume, reported as Usage.load_ns."""
    params = request.sampling
    out = _Output(emit=emit, matcher=StopMatcher(tuple(params.stop)))
    started = time.perf_counter_ns()
    prepared = session.prepare(prompt)
    until = _Until(request, time.monotonic() + request.prompt_deadline_s if request.prompt_deadline_s else None)
    done = session.decode(prepared.to_eval, until)
    prefilled = time.perf_counter_ns()
    if request.cancelled.is_set():
        reason, num_generated = FinishReason.CANCELLED, 0
    elif done < len(prepared.to_eval):   # the prompt deadline passed: nothing to answer from
        reason, num_generated = FinishReason.LENGTH, 0
    else:
        reason, num_generated = _sample_loop(session, request, out)
    usage = Usage(prompt_tokens=len(prompt), completion_tokens=num_generated, cached_tokens=prepared.cached,
                  prompt_eval_ns=prefilled - started, eval_ns=time.perf_counter_ns() - prefilled,
                  load_ns=load_ns)
    out.finish(reason, usage)


def _sample_loop(session: Session, request: GenerateRequest, out: _Output) -> tuple[FinishReason, int]:
    params = request.sampling
    vocab = session.model.vocab
    grammar = grammar_sampler(vocab, request.constraint) if request.constraint is not None else None
    sampler = build_sampler(params, session.tokens, grammar)
    n_ctx = min(session.n_ctx, request.num_ctx or session.n_ctx)
    deadline = time.monotonic() + request.deadline_s if request.deadline_s else None
    try:
        for num_generated in range(params.max_tokens):
            if request.cancelled.is_set():
                return FinishReason.CANCELLED, num_generated
            token = sampler.sample(session.ctx, -1)
            reason = _stop_reason(session, token, request)
            if reason is not None:
                return reason, num_generated + 1
            logprob = token_logprob(session.ctx.ctx, vocab, token, request.top_logprobs) \
                if request.top_logprobs >= 0 else None
            out.add(token, token_piece(vocab, token), logprob)
            if out.matcher.is_stopped:
                return FinishReason.STOP, num_generated + 1
            if len(session.tokens) >= n_ctx or (deadline is not None and time.monotonic() > deadline):
                return FinishReason.LENGTH, num_generated + 1
            if num_generated + 1 < params.max_tokens:
                session.decode([token])   # its KV, and the logits of the next step
        return FinishReason.LENGTH, params.max_tokens
    finally:
        sampler.close()
