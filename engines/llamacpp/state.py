"""Pause and resume of a llama.cpp context: every sequence's KV to host memory and back.

llama.cpp owns its KV buffer, so this engine cannot hand back pages one by one
the way kvcached does; instead pause copies each slot's sequence state
(llama_state_seq_get_data: that sequence's KV cells) to host memory with the
tokens it holds, and frees the context, weights kept. Resume makes a context
with the same parameters and restores every sequence into its own slot, so a
request that was mid-answer goes on where it was, and the next turn of a
conversation finds its prefix cached and evaluates only its new tokens.
Pause runs between two batch steps, when no slot is waiting for logits.

When the host itself runs short of memory (kvcached's HostRelief), `spill` writes
each paused sequence's state to a checksummed file (kvcached/kv_cache/spill_file.py)
and drops it from memory; resume reads it back, and a file that is not whole and
ours is refused: that sequence re-evaluates, nothing of the file reaches llama.cpp.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import llama_cpp
from llama_cpp import _internals as internals

from engines.llamacpp.prompt_cache import PromptCache
from engines.llamacpp.session import Session
from kvcached.errors import KVFileRejected
from kvcached.kv_cache import spill_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PausedSeq:
    state: bytes | memoryview | None   # a sequence's cells, as Session.save_seq returns them
    tokens: tuple[int, ...]
    spilled: Path | None = None        # where `state` went when the host ran short (state None)
    nbytes: int = 0                    # the spilled state's size

    def identity(self) -> dict:
        return {"seq_file": self.spilled.name if self.spilled else "", "nbytes": self.nbytes}

    def load_state(self) -> bytes | memoryview:
        """The state, read back from its file where it was spilled (KVFileRejected if damaged)."""
        if self.spilled is None:
            return self.state
        out = bytearray(self.nbytes)
        try:
            spill_file.read_into(self.spilled, self.identity(), out)
        finally:
            self.spilled.unlink(missing_ok=True)
        return memoryview(out)


@dataclass(frozen=True)
class PausedState:
    seqs: dict[int, PausedSeq]     # slot (seq id) -> its state; slots that held nothing are absent

    @property
    def host_bytes(self) -> int:
        return sum(len(s.state) for s in self.seqs.values() if s.state is not None)

    @property
    def disk_bytes(self) -> int:
        return sum(s.nbytes for s in self.seqs.values() if s.spilled is not None)

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


def spill(paused: PausedState, folder: Path) -> tuple[PausedState, int]:
    """Every in-memory sequence state to its own file under folder; (the new record, host
    bytes freed). A state that cannot be written stays in memory (logged)."""
    seqs, freed = {}, 0
    for seq_id, seq in paused.seqs.items():
        seqs[seq_id] = seq
        if seq.state is None:
            continue
        path = Path(folder) / f"{uuid.uuid4().hex}{spill_file.SUFFIX}"
        spilled = replace(seq, state=None, spilled=path, nbytes=len(seq.state))
        try:
            spill_file.write(path, spilled.identity(), seq.state)
        except OSError as exc:
            log.warning("paused sequence %d not spilled to %s: %s", seq_id, path, exc)
            continue
        seqs[seq_id], freed = spilled, freed + spilled.nbytes
    return PausedState(seqs), freed


def discard(paused: PausedState | None) -> None:
    """The spilled files of a paused state that will never resume (an unload)."""
    for seq in (paused.seqs.values() if paused is not None else ()):
        if seq.spilled is not None:
            seq.spilled.unlink(missing_ok=True)


def resume_session(model: internals.LlamaModel, params: llama_cpp.llama_context_params,
                   paused: PausedState, prompt_cache: PromptCache | None = None) -> Session:
    """A new context with every paused sequence restored into its own slot (the batcher
    marks the slots of requests still running busy again)."""
    started = time.perf_counter()
    session = Session(model, params, prompt_cache)
    for seq_id, seq in paused.seqs.items():
        slot = session.slots[seq_id]
        try:
            session.load_seq(slot, seq.load_state(), list(seq.tokens))
        except KVFileRejected as exc:   # never read into llama.cpp
            log.warning("spilled sequence %d refused (%s); it starts afresh", seq_id, exc)
            session.forget(slot)
        except RuntimeError:
            # A state that does not fit back is not fatal: its sequence re-evaluates.
            log.exception("restoring sequence %d failed; it starts afresh", seq_id)
            session.forget(slot)
    log.info("resumed a llama.cpp context: %d sequences, %d tokens in %.1f ms", len(paused.seqs),
             session.num_tokens, (time.perf_counter() - started) * 1e3)
    return session
