"""The broker takes a busy TorchEngine's cached prefixes, not just a trim.

Real parts: the bundled SmolLM2-135M, its KV in kvcached host-backend pages
(shared memory: RssShmem counts them exactly), the real Broker with its
ladder, and engines.broker_client's verbs. Only the device's free memory is
scripted (CONVENTIONS 10), to put the model 1 byte into the headroom.

Seen on the H100 (benchmarks/desktop_pressure.py, run 1): a model kept busy by an
editor stream held ~7 GiB of finished requests' prefixes; the broker's trim gave
back a little, which covered the shortfall NVML showed, and the prefixes stayed
while the other app's next allocation failed.
"""
from __future__ import annotations

import pytest

from engines.base import ModelInfo
from engines.broker_client import register_engine
from engines.config import EngineConfig
from engines.torch.engine import TorchEngine
from engines.torch.load.gguf_loader import bundled_model_path
from engines.types import GenerateRequest, RequestKind, SamplingParams
from kvcached.broker import Broker
from kvcached.broker.monitor import MemorySample
from kvcached.config import KvcachedConfig
from kvcached.rss import rss_shmem_bytes
from kvcached.standalone import standalone_pool

MiB = 1 << 20
TOTAL = 64 << 30
HEADROOM = 256 * MiB


class ScriptedDevice:
    """Free memory as if others left the model exactly `short` bytes into the headroom."""

    name = "scripted"

    def __init__(self, engine: TorchEngine, short: int) -> None:
        report = engine.memory()
        self.engine = engine
        self.others = TOTAL - report.total_bytes - HEADROOM + short

    def sample(self) -> MemorySample:
        ours = self.engine.memory().total_bytes
        return MemorySample(TOTAL, TOTAL - ours - self.others, ours, self.others)

    def close(self) -> None:
        pass


def words(start: int, n: int) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def complete(text: str, max_tokens: int = 2) -> GenerateRequest:
    return GenerateRequest(kind=RequestKind.COMPLETION, prompt=text,
                           sampling=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


@pytest.fixture(scope="module")
def engine():
    eng = TorchEngine(ModelInfo(name="smollm2", path=str(bundled_model_path())),
                      EngineConfig(torch_num_slots=4, torch_max_context=768, torch_prefill_chunk=256,
                                   max_queue=4, torch_llamacpp_numerics=False),
                      standalone_pool(KvcachedConfig(reserve_pages=0)))
    eng.load()
    yield eng
    eng.unload()


def test_busy_engine_gives_back_finished_prefixes_not_only_a_trim(engine):
    # Three requests at once, as the benchmark's pre-grow: three slots, three cached
    # prefixes (one after another, each would reuse the last one's slot: they share BOS).
    prompts = [words(start, 60) for start in (0, 1000, 2000)]
    streams = [engine.generate(complete(p)) for p in prompts]
    assert all(list(s)[-1].usage.prompt_tokens > 100 for s in streams)
    # A shorter request sharing the start of one reuses its slot: the slot's tail
    # pages hold no live token now, so a trim gives a little back.
    last = list(engine.generate(complete(words(0, 10) + " other words")))[-1]
    assert last.usage.cached_tokens > 10
    held_before, shmem_before = engine.memory().kv_held_bytes, rss_shmem_bytes()

    # The editor's request keeps the model busy while others grow into the headroom.
    running = engine.generate(complete(words(5000, 5), max_tokens=700))
    next(running)
    assert engine.busy
    broker = Broker(KvcachedConfig(headroom_bytes=HEADROOM, reclaim_hysteresis_bytes=64 * MiB),
                    ScriptedDevice(engine, short=1))
    register_engine(broker, engine)
    try:
        got = broker.tick()
        shmem_after, report = rss_shmem_bytes(), engine.memory()
        idle_prefixes = [len(s.tokens) for s in engine.loop.scheduler.prefix_cache.slots if not s.is_running]
        assert engine.busy, "the reclaim must happen while the model serves"
    finally:
        running.close()                          # cancels the long request
        broker.close()

    steps = [e.step for e in broker.events.recent()]
    assert steps == ["trim", "drop_prefixes"]    # a busy model is never paused or unloaded
    assert got >= 64 * MiB // 2 and idle_prefixes == [0, 0, 0]
    # What is left is the running request's pages: under a page beyond its live KV.
    assert report.kv_held_bytes - report.kv_live_bytes < 2 * MiB
    assert report.kv_held_bytes < held_before
    assert shmem_before - shmem_after >= got // 2   # real memory fell (the running request grows meanwhile)
    # Nothing lost: the model answers afterwards; its prefix went (only the BOS the
    # cancelled request kept can be reused).
    last = list(engine.generate(complete(prompts[0])))[-1]
    assert last.usage.cached_tokens <= 1 and last.usage.completion_tokens == 2


def test_a_verb_gets_in_at_the_next_step_boundary(engine):
    """The broker's verbs wait for the step in flight, not for a free moment: with a
    bare lock the worker took it back for its next step before the waiting broker
    thread woke (the H100 run's trim waited 41 s, partly behind graph captures)."""
    steps = []
    real_run = engine.loop.runner.run
    engine.loop.runner.run = lambda plan: (steps.append(1), real_run(plan))[1]   # counts, runs the real step
    running = engine.generate(complete(words(7000, 5), max_tokens=700))
    try:
        next(running)
        during = []
        for _ in range(5):
            before = len(steps)
            engine.trim()
            during.append(len(steps) - before)
        assert engine.busy
    finally:
        running.close()
        del engine.loop.runner.run
    # The step in flight, and at most one the worker had begun before it saw the caller.
    assert max(during) <= 2, during
