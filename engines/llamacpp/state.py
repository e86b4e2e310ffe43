"""Pause and resume of a llama.cpp context: KV to host memory and back.

llama.cpp owns its KV buffer, so this engine cannot hand back pages one by one
the way kvcached does; instead pause copies the context state
(llama_state_get_data: the KV cells in use and the last logits) to host
memory, remembers which tokens it holds, and frees the context, weights kept.
Resume makes a context with the same parameters and restores the state, so
the next turn of a conversation finds its prefix in the KV cache and
evaluates only its new tokens.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import llama_cpp
from llama_cpp import _internals as internals

from engines.llamacpp.session import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PausedState:
    state: bytes          # empty when the context held no tokens
    tokens: tuple[int, ...]

    @property
    def host_bytes(self) -> int:
        return len(self.state)


def pause_session(session: Session) -> PausedState:
    """Save the session's state to host memory and free its context."""
    started = time.perf_counter()
    paused = PausedState(state=session.save_state() if session.tokens else b"", tokens=tuple(session.tokens))
    session.close()
    log.info("paused a llama.cpp context: %d tokens, %d bytes to host in %.1f ms",
             len(paused.tokens), paused.host_bytes, (time.perf_counter() - started) * 1e3)
    return paused


def resume_session(model: internals.LlamaModel, params: llama_cpp.llama_context_params,
                   paused: PausedState) -> Session:
    """A new context with the paused state restored; the KV holds the same tokens again."""
    started = time.perf_counter()
    session = Session(model, params)
    if paused.tokens:
        try:
            session.load_state(paused.state, list(paused.tokens))
        except RuntimeError:
            # A state that does not fit back is not fatal: the next request re-evaluates.
            log.exception("restoring the paused state failed; the next request starts afresh")
            session.clear()
    log.info("resumed a llama.cpp context: %d tokens in %.1f ms",
             len(session.tokens), (time.perf_counter() - started) * 1e3)
    return session
