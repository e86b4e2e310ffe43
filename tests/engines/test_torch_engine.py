"""TorchEngine end to end on the bundled SmolLM2-135M (real weights, real tokenizer,
kvcached host-backend KV): streaming, stops, batching, prefix reuse, cancel,
pause/resume, embeddings and typed errors."""
from __future__ import annotations

import math
import threading

import pytest

from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.errors import ContextOverflow, InfillUnsupported, InvalidRequest
from engines.torch.engine import TorchEngine
from engines.torch.load.gguf_loader import bundled_model_path
from engines.types import ChatMessage, FinishReason, GenerateRequest, ModelState, RequestKind, SamplingParams
from kvcached.standalone import standalone_pool

GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def engine():
    eng = TorchEngine(ModelInfo(name="smollm2", path=str(bundled_model_path())),
                      EngineConfig(torch_num_slots=4, torch_max_context=256, torch_prefill_chunk=32,
                                   max_queue=4, torch_llamacpp_numerics=False), standalone_pool())
    eng.load()
    yield eng
    assert eng.unload() > 0 and eng.state is ModelState.UNLOADED


def chat(text: str, sampling: SamplingParams = GREEDY, history: tuple = ()) -> GenerateRequest:
    return GenerateRequest(kind=RequestKind.CHAT, sampling=sampling,
                           messages=history + (ChatMessage("user", text),))


def collect(engine, request):
    chunks = list(engine.generate(request))
    assert all(c.finish_reason is None for c in chunks[:-1])
    return "".join(c.text for c in chunks), chunks[-1]


def test_chat_streams_and_ends(engine):
    text, last = collect(engine, chat("What is the capital of France?", SamplingParams(temperature=0, max_tokens=16)))
    assert "Paris" in text
    assert last.finish_reason is FinishReason.STOP and last.usage.completion_tokens < 16
    assert last.usage.prompt_tokens > 10
    assert not engine.busy


def test_max_tokens_gives_length_with_exact_count(engine):
    text, last = collect(engine, chat("Count from one to twenty in words."))
    assert last.finish_reason is FinishReason.LENGTH and last.usage.completion_tokens == 6 and text


def test_next_turn_reuses_the_prefix_and_answers_the_same(engine):
    engine.drop_prefixes()
    first, last = collect(engine, chat("Name a fruit."))
    assert last.usage.cached_tokens == 0
    history = (ChatMessage("user", "Name a fruit."), ChatMessage("assistant", first))
    follow = chat("And a vegetable?", history=history)
    reused, last = collect(engine, follow)
    assert last.usage.cached_tokens > last.usage.prompt_tokens // 2
    engine.drop_prefixes()
    fresh, last = collect(engine, chat("And a vegetable?", history=history))
    assert last.usage.cached_tokens == 0 and fresh == reused


def test_stop_string_is_cut_and_never_sent(engine):
    full, _ = collect(engine, chat("Count from one to twenty in words."))
    stop = full.strip()[3:6]
    text, last = collect(engine, chat("Count from one to twenty in words.",
                                      SamplingParams(temperature=0, max_tokens=6, stop=(stop,))))
    assert last.finish_reason is FinishReason.STOP and stop not in text and full.startswith(text)


def test_concurrent_requests_batch_and_match_solo_outputs(engine):
    prompts = ["Say hello.", "Name a color."]
    solo = {p: collect(engine, chat(p))[0] for p in prompts}
    results: dict[str, str] = {}

    def worker(p: str) -> None:
        results[p] = collect(engine, chat(p))[0]

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == solo


def test_seeded_sampling_repeats(engine):
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.0, seed=7, max_tokens=6)
    assert collect(engine, chat("Tell me a story.", params))[0] == collect(engine, chat("Tell me a story.", params))[0]


def test_cancel_mid_stream_frees_the_slot(engine):
    request = chat("Count from one to twenty in words.", SamplingParams(temperature=0, max_tokens=200))
    stream = engine.generate(request)
    next(stream)
    request.cancel()
    last = list(stream)[-1]
    assert last.finish_reason is FinishReason.CANCELLED
    assert not engine.busy


def test_typed_errors(engine):
    with pytest.raises(ContextOverflow):
        engine.generate(GenerateRequest(kind=RequestKind.COMPLETION, prompt="word " * 400))
    with pytest.raises(InfillUnsupported):
        engine.generate(GenerateRequest(kind=RequestKind.INFILL, prompt="def f(", suffix="):\n"))
    with pytest.raises(InvalidRequest):
        engine.generate(GenerateRequest(kind=RequestKind.CHAT))
    with pytest.raises(InvalidRequest):
        engine.detokenize([10 ** 9])


def test_pause_gives_pages_back_and_the_next_request_resumes_bit_exact(engine):
    engine.drop_prefixes()
    first, _ = collect(engine, chat("Name a planet."))
    history = (ChatMessage("user", "Name a planet."), ChatMessage("assistant", first))
    before = engine.memory()
    assert before.kv_held_bytes > 0
    assert engine.pause() > 0 and engine.state is ModelState.PAUSED
    paused = engine.memory()
    assert paused.kv_held_bytes == 0 and paused.paused_host_bytes > 0
    reused, last = collect(engine, chat("And a star?", history=history))
    assert engine.state is ModelState.LOADED and last.usage.cached_tokens > 0
    engine.drop_prefixes()
    assert collect(engine, chat("And a star?", history=history))[0] == reused


def test_trim_and_drop_prefixes_return_bytes(engine):
    collect(engine, chat("Hi"))
    assert engine.memory().kv_held_bytes > 0
    assert engine.drop_prefixes() > 0
    assert engine.memory().kv_held_bytes == 0 and engine.trim() == 0


def test_embeddings_are_unit_vectors_and_tokenize_round_trips(engine):
    result = engine.embed(["The cat sat on the mat.", "def main():\n    pass"])
    assert len(result.vectors) == 2 and result.prompt_tokens > 5
    for vec in result.vectors:
        assert math.isclose(sum(x * x for x in vec), 1.0, rel_tol=1e-4)
    assert result.vectors[0] == engine.embed(["The cat sat on the mat."]).vectors[0]
    text = "héllo  wörld\n\tcode()"
    assert engine.detokenize(engine.tokenize(text)) == text
