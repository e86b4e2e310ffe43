"""Pause and resume of a llama.cpp context: every sequence's KV to host memory and back.

llama.cpp owns its KV buffer, so this engine cannot hand back pages one by one
the way kvcached does; instead pause copies each slot's sequence state
(llama_state_seq_get_data: that sequence's KV cells) to host memory with the
tokens it holds, and frees the context, weights kept. Resume makes a context
with the same parameters and restores every sequence into its own slot, so a
request that was mid-answer goes on where it was, and the next turn of a
conversation finds its prefix cached and evaluates only its new tokens.
Pause runs between two batch steps, when no slot is waiting for logits.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import llama_cpp
from llama_cpp import _internals as internals

from engines.llamacpp.prompt_cache import PromptCache
from engines.llamacpp.session import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PausedSeq:
    state: bytes | memoryview   # a sequence's cells, as Session.save_seq returns them
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class PausedState:
    seqs: dict[int, PausedSeq]     # slot (seq id) -> its state; slots that held nothing are absent

    @property
    def host_bytes(self) -> int:
        return sum(len(s.state) for s in self.seqs.values())

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seqs.values())


def pause_session(session: Session) -> PausedState:
    """Save every sequence's state to host memory and free the context."""
    started = time.perf_counter()
    paused = PausedState({slot.seq_id: PausedSeq(session.save_seq(slot), tuple(slot.tokens))
                          for slot in session.slots if slot.tokens})
    session.close()
    log.info("paused a llama.cpp context: %d sequences, %d tokens, %d bytes to host in %.1f ms",
             len(paused.seqs), paused.num_tokens, paused.host_bytes, (time.perf_counter() - started) * 1e3)
    return paused


def resume_session(model: internals.LlamaModel, params: llama_cpp.llama_context_params,
                   paused: PausedState, prompt_cache: PromptCache | None = None) -> Session:
    """A new context with every paused sequence restored into its own slot (the batcher
    marks the slots of requests still running busy again)."""
    started = time.perf_counter()
    session = Session(model, params, prompt_cache)
    for seq_id, seq in paused.seqs.items():
        slot = session.slots[seq_id]
        try:
            session.load_seq(slot, seq.state, list(seq.tokens))
        except RuntimeError:
            # A state that does not fit back is not fatal: its sequence re-evaluates.
            log.exception("restoring sequence %d failed; it starts afresh", seq_id)
            session.forget(slot)
    log.info("resumed a llama.cpp context: %d sequences, %d tokens in %.1f ms", len(paused.seqs),
             session.num_tokens, (time.perf_counter() - started) * 1e3)
    return session
