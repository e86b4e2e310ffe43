"""Many requests at once on one llama.cpp context (issue 21): they decode together, each
with its own sampler; a request never waits for another's whole answer; prefixes are
shared across slots; pause/resume keeps every running sequence; a full KV pool
preempts and the preempted answer still completes. Real llama.cpp on the default model.

Outputs are compared only between runs whose batches are identical (requests admitted
in one step, `admitted_together`): a token's logits depend, in the last bits, on what
else shares its batch."""
from __future__ import annotations


import pytest

from engines.llamacpp.engine import LlamaCppEngine
from engines.types import FinishReason, GenerateRequest, ModelState, RequestKind, SamplingParams
from llamacpp_support import default_info, small_config


def completion(prompt: str, **sampling) -> GenerateRequest:
    return GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt,
                           sampling=SamplingParams(**{"temperature": 0, "max_tokens": 12, **sampling}))


@pytest.fixture(scope="module")
def engine():
    engine = LlamaCppEngine(default_info(), small_config(llama_n_ctx=1024, llama_num_slots=4, max_queue=8))
    engine.load()
    yield engine
    engine.unload()


def texts(streams) -> list[str]:
    return ["".join(c.text for c in stream) for stream in streams]


def test_a_second_request_starts_before_the_first_ends(engine: LlamaCppEngine) -> None:
    long = engine.generate(completion("Count: 1, 2, 3,", max_tokens=60, ignore_eos=True))
    next(long)                                       # the first is generating
    short = engine.generate(completion("Hello", max_tokens=2))
    chunks = list(short)                             # finishes while the first still runs
    assert chunks[-1].finish_reason is not None
    assert engine.busy
    rest = list(long)
    assert rest[-1].finish_reason is FinishReason.LENGTH and rest[-1].usage.completion_tokens == 60


def test_each_sequence_samples_with_its_own_sampler(engine: LlamaCppEngine) -> None:
    hot = dict(temperature=1.5, top_k=0, top_p=1.0, max_tokens=16, ignore_eos=True)
    with engine.admitted_together():
        streams = [engine.generate(completion("Once upon a time", seed=7, **hot)),
                   engine.generate(completion("Once upon a time", seed=7, **hot)),
                   engine.generate(completion("Once upon a time", **{**hot, "temperature": 0}))]
    same_a, same_b, greedy = texts(streams)
    # One shared chain would draw twice from one generator: the twins would differ.
    assert same_a == same_b
    alone = texts([engine.generate(completion("Once upon a time", **{**hot, "temperature": 0}))])[0]
    assert greedy.split()[:2] == alone.split()[:2]   # the greedy one took no draws of theirs


def test_a_shared_prefix_is_read_once(engine: LlamaCppEngine) -> None:
    system = "You are a careful assistant who answers in one short sentence. " * 6
    first = list(engine.generate(completion(system + "What is rain?")))[-1].usage
    assert first.cached_tokens == 0 or first.cached_tokens < first.prompt_tokens // 2
    long = engine.generate(completion(system + "Count: 1, 2,", max_tokens=40, ignore_eos=True))
    next(long)
    second = list(engine.generate(completion(system + "What is snow?")))[-1].usage
    assert second.cached_tokens >= second.prompt_tokens - 8      # the system prompt was cached
    list(long)


def test_pause_mid_answer_keeps_every_sequence(engine: LlamaCppEngine) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]

    def run(pause: bool) -> list[str]:
        engine.drop_prefixes()
        with engine.admitted_together():
            streams = [engine.generate(completion(p, max_tokens=24, ignore_eos=True)) for p in prompts]
        heads = [next(s).text for s in streams]
        if pause:
            assert engine.pause() > 0          # mid-answer: three sequences saved, context freed
        return [h + t for h, t in zip(heads, texts(streams))]

    paused = run(pause=True)
    # The resumed context decoded only generated tokens: no prompt was read again.
    assert engine.num_evaluated <= len(prompts) * 24 and engine.state is ModelState.LOADED
    assert paused == run(pause=False)


def test_a_full_kv_pool_preempts_and_every_answer_completes() -> None:
    engine = LlamaCppEngine(default_info(), small_config(llama_n_ctx=128, llama_num_slots=3))
    engine.load()
    try:
        with engine.admitted_together():
            streams = [engine.generate(completion(f"List {i}: a, b, c,", max_tokens=70, ignore_eos=True))
                       for i in range(3)]
        lasts = [list(s)[-1] for s in streams]
        # 3 x (~8 + 70) tokens do not fit 128 cells: some waited and re-read their tokens.
        assert all(last.finish_reason is FinishReason.LENGTH for last in lasts)
        assert all(last.usage.completion_tokens == 70 for last in lasts)
    finally:
        engine.unload()


def test_slots_are_bounded_by_the_setting(engine: LlamaCppEngine) -> None:
    with engine.admitted_together():
        streams = [engine.generate(completion(f"{i}:", max_tokens=400, ignore_eos=True)) for i in range(6)]
    for stream in streams[:4]:
        next(stream)                                  # four slots: four are generating
    assert (engine.num_running, engine.num_waiting) == (4, 2)
    for stream in streams:
        stream.close()
    assert all(list(s) == [] for s in streams)
