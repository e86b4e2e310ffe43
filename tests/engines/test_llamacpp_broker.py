"""A llama.cpp engine registered with the real broker: the broker's verbs reach the
engine, pause gives the KV bytes back, and the next request still answers."""
from __future__ import annotations

import pytest

from engines.broker_client import EngineVerbs, load_estimate, register_engine
from engines.llamacpp.engine import LlamaCppEngine
from engines.types import GenerateRequest, ModelState, RequestKind, SamplingParams
from kvcached.broker import Broker, MemorySample, Step
from kvcached.broker.client import ReclaimVerbs
from kvcached.config import KvcachedConfig
from llamacpp_support import default_info, small_config

GiB = 1 << 30


class PlentyMonitor:
    """The device as a scripted sample: lots free, so only explicit reclaims act."""
    name = "scripted"

    def sample(self) -> MemorySample:
        return MemorySample(total_bytes=16 * GiB, free_bytes=12 * GiB, ours_bytes=0, others_bytes=4 * GiB)

    def close(self) -> None:
        pass


@pytest.fixture()
def engine():
    engine = LlamaCppEngine(default_info(), small_config())
    engine.load()
    yield engine
    engine.unload()


def test_verbs_satisfy_the_broker_protocol(engine: LlamaCppEngine) -> None:
    assert isinstance(EngineVerbs(engine), ReclaimVerbs)


def test_broker_pauses_the_engine_and_it_answers_after(engine: LlamaCppEngine) -> None:
    broker = Broker(KvcachedConfig(backend="host"), monitor=PlentyMonitor())
    handle = register_engine(broker, engine, priority=1)
    request = GenerateRequest(kind=RequestKind.COMPLETION, prompt="Hello",
                              sampling=SamplingParams(temperature=0, max_tokens=2))
    list(engine.generate(request))
    held = handle.verbs.held_bytes()
    assert held == engine.memory().total_bytes > 0
    kv = engine.memory().kv_held_bytes
    got = broker.reclaim(client=handle, steps=(Step.TRIM, Step.PAUSE))
    assert got == kv and engine.state is ModelState.PAUSED
    assert [(e.step, e.bytes_returned) for e in broker.events.recent()][-1] == ("pause", kv)
    assert list(engine.generate(request))[-1].finish_reason is not None
    assert engine.state is ModelState.LOADED
    handle.unregister()
    assert broker.clients() == []


def test_load_estimate_is_close_to_what_a_load_holds(engine: LlamaCppEngine) -> None:
    estimate = load_estimate(engine.info, engine.n_ctx)
    assert abs(estimate - engine.memory().total_bytes) < 0.1 * estimate
