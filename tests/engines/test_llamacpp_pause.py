"""Pause then resume continues a conversation without re-evaluating its earlier turns.

Done-when of issue 6: a greedy two-turn chat on the real default model. The run
that is paused between the turns must produce exactly what the unpaused run
produces, and its second turn must evaluate only the tokens that are new since
the first (the same count as the unpaused run, far fewer than the prompt).
The contrast run drops the cached conversation instead, and pays the full prefill.
"""
from __future__ import annotations

import pytest

from engines.llamacpp.engine import LlamaCppEngine
from engines.types import ChatMessage, GenerateRequest, ModelState, RequestKind, SamplingParams
from llamacpp_support import default_info, small_config

GREEDY = SamplingParams(temperature=0, max_tokens=8)
FIRST = ChatMessage("user", "Name three colours.")
SECOND = ChatMessage("user", "And one more?")


@pytest.fixture(scope="module")
def engine():
    engine = LlamaCppEngine(default_info(), small_config())
    engine.load()
    yield engine
    engine.unload()


def chat(engine: LlamaCppEngine, *messages: ChatMessage):
    chunks = list(engine.generate(GenerateRequest(kind=RequestKind.CHAT, messages=messages, sampling=GREEDY)))
    return "".join(c.text for c in chunks), chunks[-1].usage


def conversation(engine: LlamaCppEngine, between_turns) -> tuple[str, str, object, int]:
    engine.drop_prefixes()                     # every run starts from an empty cache
    reply1, usage1 = chat(engine, FIRST)
    assert usage1.cached_tokens == 0
    between_turns()
    before = engine.num_evaluated
    reply2, usage2 = chat(engine, FIRST, ChatMessage("assistant", reply1), SECOND)
    evaluated = engine.num_evaluated - before
    return reply1, reply2, usage2, evaluated


def test_pause_resume_continues_without_new_prefill(engine: LlamaCppEngine) -> None:
    plain = conversation(engine, lambda: None)

    def pause() -> None:
        freed = engine.pause()
        report = engine.memory()
        assert freed > 0 and engine.state is ModelState.PAUSED
        assert report.kv_held_bytes == 0 and report.paused_host_bytes > 0

    paused = conversation(engine, pause)
    assert engine.state is ModelState.LOADED
    assert paused[:2] == plain[:2]                       # greedy: the same words, both turns
    usage_plain, usage_paused = plain[2], paused[2]
    assert usage_paused.cached_tokens == usage_plain.cached_tokens
    new_tokens = usage_paused.prompt_tokens - usage_paused.cached_tokens
    assert usage_paused.cached_tokens > usage_paused.prompt_tokens // 2    # the earlier turn was kept
    # What the second turn decoded after resume: only its new prompt tokens, then its reply.
    assert paused[3] == plain[3] == new_tokens + usage_paused.completion_tokens - 1


def test_dropping_the_cache_instead_pays_the_full_prefill(engine: LlamaCppEngine) -> None:
    _, _, usage, evaluated = conversation(engine, engine.drop_prefixes)
    assert usage.cached_tokens == 0
    assert evaluated == usage.prompt_tokens + usage.completion_tokens - 1


def test_pause_and_resume_are_idempotent(engine: LlamaCppEngine) -> None:
    engine.resume()
    engine.pause()
    assert engine.pause() == 0
    engine.resume()
    engine.resume()
    assert engine.state is ModelState.LOADED and engine.memory().kv_held_bytes > 0
