"""Idle conversations parked in host memory (engines/llamacpp/prompt_cache.py): the
cells of a conversation that is not running leave the unified KV pool, so the next
prompt's attention does not walk them, and its next turn comes back from host
memory instead of being read again. The bookkeeping on its own, then real llama.cpp
on the default model."""
from __future__ import annotations

import pytest

from engines.llamacpp.engine import LlamaCppEngine
from engines.llamacpp.prompt_cache import PromptCache
from engines.types import GenerateRequest, RequestKind, SamplingParams
from llamacpp_support import default_info, small_config


# --- the bookkeeping ---------------------------------------------------------------

def test_the_oldest_parked_conversation_goes_first_when_over_budget() -> None:
    cache = PromptCache(max_bytes=250)
    assert cache.park([1, 2, 3], b"a" * 100) and cache.park([4, 5, 6], b"b" * 100)
    assert cache.park([7, 8, 9], b"c" * 100)
    assert cache.num_prompts == 2 and cache.host_bytes == 200
    assert cache.best_for([1, 2, 3, 10], cached=0) is None        # [1, 2, 3] was the oldest
    assert cache.best_for([7, 8, 9, 10], cached=0)[1] == 3


def test_a_conversation_larger_than_the_budget_is_not_parked() -> None:
    cache = PromptCache(max_bytes=50)
    assert not cache.park([1, 2, 3], b"x" * 51)
    assert cache.num_prompts == 0


def test_the_next_turn_replaces_the_turn_it_extends() -> None:
    cache = PromptCache(max_bytes=1000)
    cache.park([1, 2, 3], b"a" * 10)
    cache.park([1, 2, 3, 4, 5], b"b" * 20)
    assert cache.num_prompts == 1 and cache.host_bytes == 20
    assert cache.covers([1, 2, 3]) and cache.covers([1, 2, 3, 4, 5]) and not cache.covers([1, 2, 4])


def test_a_restore_must_save_more_than_the_slots_give_and_pay_for_its_copy() -> None:
    cache = PromptCache(max_bytes=10_000)
    cache.park(list(range(100)), b"s" * 100)
    entry, keep = cache.best_for(list(range(50)) + [999], cached=0)
    assert keep == 50                          # cut at the common prefix
    assert cache.best_for(list(range(50)) + [999], cached=50) is None       # the slots already give it
    assert cache.best_for([0, 1, 2, 999], cached=0) is None                  # 3 of 100 tokens: not worth a copy
    assert cache.best_for(list(range(100)), cached=0)[1] == 99              # the last token is evaluated again
    assert cache.best_for([5, 6, 7], cached=0) is None                       # nothing in common: never restored


# --- on the real engine ---------------------------------------------------------------

def completion(prompt: str, max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt,
                           sampling=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


def answer(engine: LlamaCppEngine, prompt: str, max_tokens: int = 8):
    chunks = list(engine.generate(completion(prompt, max_tokens)))
    return "".join(c.text for c in chunks), chunks[-1].usage


CHAT_A = "A conversation about the weather in the mountains, where the wind is strong. " * 3
CHAT_B = "Another conversation, about writing Python functions that sort lists quickly. " * 3


@pytest.fixture
def engine():
    engine = LlamaCppEngine(default_info(), small_config(llama_n_ctx=1024, llama_num_slots=4))
    engine.load()
    yield engine
    engine.unload()


def test_an_idle_conversation_leaves_the_pool_and_its_next_turn_comes_back(engine: LlamaCppEngine) -> None:
    text_a, first = answer(engine, CHAT_A)
    answer(engine, CHAT_B)
    session = engine._session
    assert [bool(s.tokens) for s in session.slots].count(True) == 1   # A's cells were freed, only B's remain
    assert engine.memory().prompt_cache_host_bytes > 0            # A is in host memory, and reported
    evaluated = session.num_evaluated
    text_a2, again = answer(engine, CHAT_A + text_a + " Later,")
    assert session.prompt_cache.restored == 1
    assert again.cached_tokens >= first.prompt_tokens             # A's turn came back: not read again
    assert session.num_evaluated - evaluated <= again.prompt_tokens - first.prompt_tokens + 8 + 1


def test_a_restored_conversation_answers_as_if_it_had_never_left(engine: LlamaCppEngine) -> None:
    text_a, _ = answer(engine, CHAT_A)
    follow_up = CHAT_A + text_a + " Later,"
    kept, _ = answer(engine, follow_up, 16)            # A stayed in its slot
    engine.drop_prefixes()
    answer(engine, CHAT_A)
    answer(engine, CHAT_B)                             # A parked in host memory
    restored, usage = answer(engine, follow_up, 16)    # and restored into a slot
    assert engine._session.prompt_cache.restored == 1 and usage.cached_tokens > 0
    assert restored == kept


def test_drop_prefixes_empties_the_host_cache_too(engine: LlamaCppEngine) -> None:
    answer(engine, CHAT_A)
    answer(engine, CHAT_B)
    assert engine.memory().prompt_cache_host_bytes > 0
    assert engine.drop_prefixes() > 0
    assert engine.memory().prompt_cache_host_bytes == 0


def test_without_a_host_cache_idle_conversations_stay_in_their_cells() -> None:
    engine = LlamaCppEngine(default_info(), small_config(llama_n_ctx=1024, llama_num_slots=4,
                                                         llama_prompt_cache_bytes=0))
    engine.load()
    try:
        text_a, first = answer(engine, CHAT_A)
        answer(engine, CHAT_B)
        assert engine.memory().prompt_cache_host_bytes == 0
        _, again = answer(engine, CHAT_A + text_a + " Later,")
        assert again.cached_tokens >= first.prompt_tokens          # still in its slot: prefix reuse as before
    finally:
        engine.unload()
