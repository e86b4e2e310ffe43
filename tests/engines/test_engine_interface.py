"""The engine contract (engines.base.Engine), the same tests over every engine on the real
default model: streaming, max_tokens, stop strings, cancel, typed errors, embeddings,
tokens, pause/resume, busy/idle, concurrency, unload. Torch joins once its engine exists."""
from __future__ import annotations

import importlib.util
import threading
import time

import pytest

from engines.base import Engine
from engines.config import EngineConfig
from engines.errors import ContextOverflow, InfillUnsupported, InvalidRequest
from engines.types import (ChatMessage, FinishReason, GenerateRequest, ModelState, RequestKind,
                           SamplingParams)
from llamacpp_support import default_info, small_config


def make_llamacpp() -> Engine:
    from engines.llamacpp.engine import LlamaCppEngine

    return LlamaCppEngine(default_info(), small_config())


def make_torch() -> Engine:
    from engines.torch.engine import TorchEngine
    from kvcached.standalone import standalone_pool

    return TorchEngine(default_info(), EngineConfig(torch_num_slots=2, torch_max_context=512,
                                                    torch_prefill_chunk=64, max_queue=4), standalone_pool())


ENGINES = {"llamacpp": make_llamacpp}
if importlib.util.find_spec("engines.torch.engine") is not None:
    ENGINES["torch"] = make_torch


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request):
    engine = ENGINES[request.param]()
    engine.load()
    engine.load()                                  # idempotent
    yield engine
    assert engine.unload() > 0
    assert engine.state is ModelState.UNLOADED and engine.memory().weights_bytes == 0


def completion(prompt: str, **sampling) -> GenerateRequest:
    return GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt,
                           sampling=SamplingParams(**{"temperature": 0, "max_tokens": 8, **sampling}))


def collect(engine: Engine, request: GenerateRequest):
    chunks = list(engine.generate(request))
    assert chunks and all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason is not None and chunks[-1].usage is not None
    return "".join(c.text for c in chunks), chunks[-1]


def test_loaded_and_reporting_weights(engine: Engine) -> None:
    assert engine.state is ModelState.LOADED
    assert engine.memory().weights_bytes > 50 << 20


def test_max_tokens_ends_with_length_and_exact_count(engine: Engine) -> None:
    text, last = collect(engine, completion("One, two, three,", max_tokens=4, ignore_eos=True))
    assert last.finish_reason is FinishReason.LENGTH
    assert last.usage.completion_tokens == 4 and last.usage.prompt_tokens > 0 and text


def test_greedy_is_repeatable_and_chat_works(engine: Engine) -> None:
    request = lambda: GenerateRequest(kind=RequestKind.CHAT, messages=(ChatMessage("user", "Say hello."),),
                                      sampling=SamplingParams(temperature=0, max_tokens=4))
    first, _ = collect(engine, request())
    second, _ = collect(engine, request())
    assert first == second and first.strip()


def test_stop_string_cuts_the_text_before_it(engine: Engine) -> None:
    free, _ = collect(engine, completion("The alphabet: A, B, C,", max_tokens=8, ignore_eos=True))
    words = [w for w in free.split() if len(w) >= 2]
    assert words, f"the model produced too little to pick a stop string from: {free!r}"
    stop = words[len(words) // 2][:2]
    stopped, last = collect(engine, completion("The alphabet: A, B, C,", max_tokens=8, ignore_eos=True,
                                               stop=(stop,)))
    assert last.finish_reason is FinishReason.STOP
    assert stopped == free[:free.index(stop)] and stop not in stopped


def test_cancel_stops_the_stream(engine: Engine) -> None:
    request = completion("Count: 1, 2, 3,", max_tokens=200, ignore_eos=True)
    stream = iter(engine.generate(request))
    next(stream)
    request.cancel()
    last = list(stream)[-1]
    assert last.finish_reason is FinishReason.CANCELLED and last.usage.completion_tokens < 200


@pytest.mark.parametrize("request_, error", [
    (GenerateRequest(kind=RequestKind.INFILL, prompt="def add(a, b):\n", suffix="\n"), InfillUnsupported),
    (completion("word " * 2000), ContextOverflow),
    (GenerateRequest(kind=RequestKind.CHAT, messages=()), InvalidRequest),
], ids=["infill-without-fim", "context-overflow", "chat-without-messages"])
def test_bad_requests_raise_typed_errors(engine: Engine, request_: GenerateRequest, error: type) -> None:
    with pytest.raises(error):
        list(engine.generate(request_))
    assert collect(engine, completion("Still fine?", max_tokens=2))[1].finish_reason is not None


def test_embeddings_are_unit_vectors_and_repeatable(engine: Engine) -> None:
    result = engine.embed(["the cat sat on the mat", "quarterly tax filing", "the cat sat on the mat"])
    a, b, c = result.vectors
    assert len(a) == len(b) > 100 and result.prompt_tokens > 6
    assert abs(sum(x * x for x in a) - 1) < 1e-3
    assert max(abs(x - y) for x, y in zip(a, c)) < 1e-4 and a != b


def test_tokenize_round_trips(engine: Engine) -> None:
    text = "Hello, world! Ça va? 日本"
    ids = engine.tokenize(text)
    assert ids and engine.detokenize(ids) == text


def test_pause_then_next_request_resumes(engine: Engine) -> None:
    collect(engine, completion("Red, green,", max_tokens=3))
    assert engine.pause() >= 0
    assert engine.state is ModelState.PAUSED
    assert engine.memory().paused_host_bytes > 0
    _, last = collect(engine, completion("Red, green,", max_tokens=3))
    assert engine.state is ModelState.LOADED and last.finish_reason is not None
    engine.resume()
    assert engine.state is ModelState.LOADED


def test_busy_and_idle_since(engine: Engine) -> None:
    collect(engine, completion("Hi", max_tokens=2))
    assert not engine.busy
    assert engine.idle_since <= time.monotonic()
    assert engine.trim() >= 0 and engine.drop_prefixes() >= 0


def test_concurrent_requests_all_finish(engine: Engine) -> None:
    results, errors = [], []

    def run() -> None:
        try:
            results.append(collect(engine, completion("Blue, yellow,", max_tokens=4, ignore_eos=True))[0])
        except Exception as exc:  # collected: any error fails the test below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 3 and len(set(results)) == 1
