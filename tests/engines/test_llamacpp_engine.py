"""What only the llama.cpp engine does: the bounded queue answering busy, its memory
report, drop/reload, streaming with held-back stop strings, embedding limits."""
from __future__ import annotations

import pytest

from engines.errors import ContextOverflow, EngineBusy, InvalidRequest
from engines.llamacpp.engine import LlamaCppEngine
from engines.progress import ProgressBar
from engines.types import FinishReason, GenerateRequest, LoadProgress, ModelState, RequestKind, SamplingParams
from llamacpp_support import default_gguf, default_info, small_config

KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2   # SmolLM2-135M: layers x (K, V) x KV heads x head dim x f16


@pytest.fixture(scope="module")
def engine():
    events: list[LoadProgress] = []
    engine = LlamaCppEngine(default_info(), small_config(max_queue=1))
    engine.load(progress=events.append)
    engine.load_events = events
    yield engine
    engine.unload()


def completion(prompt: str, **sampling) -> GenerateRequest:
    return GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt,
                           sampling=SamplingParams(**{"temperature": 0, "max_tokens": 8, **sampling}))


def test_load_reports_progress_to_ready(engine: LlamaCppEngine) -> None:
    events = engine.load_events
    assert events[0].stage == "reading" and events[-1].stage == "ready" and events[-1].fraction == 1.0
    assert [e.fraction for e in events] == sorted(e.fraction for e in events)
    assert {e.model for e in events} == {engine.info.name}


def test_memory_report_matches_the_model(engine: LlamaCppEngine) -> None:
    list(engine.generate(completion("Hello there", max_tokens=2)))
    report = engine.memory()
    assert 0.8 * default_gguf().stat().st_size < report.weights_bytes <= default_gguf().stat().st_size
    assert report.kv_held_bytes == engine.n_ctx * KV_BYTES_PER_TOKEN
    assert 0 < report.kv_live_bytes < report.kv_held_bytes
    assert report.kv_live_bytes % KV_BYTES_PER_TOKEN == 0 and not report.on_gpu


def test_a_full_queue_answers_busy(engine: LlamaCppEngine) -> None:
    with engine.admitted_together():                 # the worker is held: nothing is admitted yet
        waiting = engine.generate(completion("Wait for me", max_tokens=2))   # queue: 1 of 1
        with pytest.raises(EngineBusy):
            engine.generate(completion("No room", max_tokens=2))
        assert engine.busy
    assert list(waiting)[-1].finish_reason is not None


def test_closing_a_stream_cancels_its_request(engine: LlamaCppEngine) -> None:
    request = completion("Count: 1, 2, 3,", max_tokens=400, ignore_eos=True)
    stream = engine.generate(request)
    next(stream)
    stream.close()
    assert request.cancelled.is_set()
    list(engine.generate(completion("Next", max_tokens=2)))   # the worker moved on
    assert not engine.busy


def test_stop_strings_never_leak_even_split_across_tokens(engine: LlamaCppEngine) -> None:
    free = "".join(c.text for c in engine.generate(completion("1, 2, 3, 4,", max_tokens=10, ignore_eos=True)))
    stop = free[3:7]    # four characters that likely span a token boundary
    assert len(stop) == 4
    chunks = list(engine.generate(completion("1, 2, 3, 4,", max_tokens=10, ignore_eos=True, stop=(stop,))))
    text = "".join(c.text for c in chunks)
    assert text == free[:free.index(stop)] and chunks[-1].finish_reason is FinishReason.STOP


def test_drop_prefixes_frees_the_idle_context_and_the_next_request_recreates_it(engine: LlamaCppEngine) -> None:
    list(engine.generate(completion("Warm up", max_tokens=1)))
    assert engine.drop_prefixes() == engine.n_ctx * KV_BYTES_PER_TOKEN
    assert engine.memory().kv_held_bytes == 0 and engine.state is ModelState.LOADED
    last = list(engine.generate(completion("Warm up", max_tokens=1)))[-1]
    assert last.usage.cached_tokens == 0 and engine.memory().kv_held_bytes > 0


def test_embedding_limits_are_typed_errors(engine: LlamaCppEngine) -> None:
    with pytest.raises(ContextOverflow):
        engine.embed(["word " * 400])
    with pytest.raises(InvalidRequest):
        engine.embed([])
    with pytest.raises(InvalidRequest):
        engine.embed(["fine", ""])


def test_empty_prompt_is_a_typed_error(engine: LlamaCppEngine) -> None:
    with pytest.raises(InvalidRequest):
        engine.generate(completion(""))


def test_unload_then_a_request_loads_again(tmp_path) -> None:
    engine = LlamaCppEngine(default_info(), small_config())
    engine.load()
    assert engine.unload() > 0 and engine.state is ModelState.UNLOADED
    assert engine.unload() == 0
    assert list(engine.generate(completion("Again", max_tokens=1)))[-1].finish_reason is not None
    assert engine.state is ModelState.LOADED
    engine.unload()


def test_progress_bar_renders_for_terminals_and_logs(tmp_path) -> None:
    import io

    log = io.StringIO()
    bar = ProgressBar(stream=log, width=10)
    for fraction, stage in ((0.0, "reading"), (0.5, "reading"), (0.95, "allocating"), (1.0, "ready")):
        bar(LoadProgress(model="m", fraction=fraction, stage=stage))
    lines = log.getvalue().splitlines()
    assert [line.split()[-2] for line in lines] == ["reading", "allocating", "ready"]   # one per stage
    assert bar.render(LoadProgress("m", 0.5, "reading")) == "m [#####-----]  50.0% reading"


def test_chunks_carry_every_generated_token(engine: LlamaCppEngine) -> None:
    chunks = list(engine.generate(completion("Numbers: 1, 2,", max_tokens=7, ignore_eos=True)))
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == chunks[-1].usage.completion_tokens == 7
    assert engine.detokenize(ids) == "".join(c.text for c in chunks)


def test_load_time_is_reported_once_by_the_first_request() -> None:
    engine = LlamaCppEngine(default_info(), small_config())
    engine.load()
    first = list(engine.generate(completion("One", max_tokens=1)))[-1].usage
    engine.pause()
    resumed = list(engine.generate(completion("One", max_tokens=1)))[-1].usage
    again = list(engine.generate(completion("One", max_tokens=1)))[-1].usage
    engine.unload()
    assert first.load_ns > resumed.load_ns > again.load_ns == 0
