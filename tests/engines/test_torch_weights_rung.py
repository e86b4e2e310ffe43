"""The weights rung on the torch engine: a paused model hands back its weights too and
comes back bit-exact, its conversation's KV reused (no prefill), no reload.

Real parts: a tiny random-weight GGUF file, the torch engine on the CPU with its
weights and KV in kvcached host-backend pages (torch_weights_to_host on; on CUDA
it is the default), the real Broker's ladder. On the CPU the rung only copies
what is already in host memory; what it shows is the mechanics: the pages go
back to the pool, the weights keep their addresses, the answer is unchanged.
The speed of the rung is the GPU's (benchmarks/weights_tier.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_torch import ask, tiny_engine, write_tiny  # noqa: E402

from engines.broker_client import register_engine  # noqa: E402
from engines.torch.engine import TorchEngine  # noqa: E402
from engines.torch.weights_rung import model_tensors  # noqa: E402
from engines.types import ModelState  # noqa: E402
from kvcached.broker import Broker  # noqa: E402
from kvcached.config import KvcachedConfig  # noqa: E402

PROMPT = "the cat sat on the mat and then the dog"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("weights") / "tiny.gguf")


def make_engine(path: Path, movable: bool) -> TorchEngine:
    return tiny_engine(path, torch_weights_to_host=movable)


def weights_of(engine: TorchEngine) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model_tensors(engine.model)]


def test_weights_step_aside_and_come_back_bit_exact_with_the_conversation(gguf_file):
    reference = make_engine(gguf_file, movable=False)
    expected, _ = ask(reference, PROMPT)
    follow_up_expected, _ = ask(reference, PROMPT + expected)
    reference.unload()

    engine = make_engine(gguf_file, movable=True)
    try:
        reply, first = ask(engine, PROMPT)
        assert reply == expected                       # the arena changes nothing computed
        before = weights_of(engine)
        addresses = [t.data_ptr() for t in model_tensors(engine.model)]
        held = engine.memory()

        freed = engine.weights_to_host()
        report = engine.memory()
        assert engine.state is ModelState.PAUSED and report.rung(engine.state) == "weights_on_host"
        assert freed >= held.weights_bytes + held.kv_live_bytes
        assert report.weights_bytes == 0 and report.kv_held_bytes == 0
        assert report.weights_host_bytes >= held.weights_bytes and report.paused_host_bytes > 0
        assert engine.kv_pool.stats().in_use_pages == 0           # nothing of the model mapped
        assert not any(t.any() for t in model_tensors(engine.model))   # the zero page
        assert engine.weights_to_host() == 0                      # idempotent

        follow_up, usage = ask(engine, PROMPT + reply)             # resumes: weights, then KV
        assert follow_up == follow_up_expected
        assert usage.cached_tokens >= first.prompt_tokens       # the first turn is not computed again
        assert engine.state is ModelState.LOADED and engine.memory().rung(engine.state) == "loaded"
        assert [t.data_ptr() for t in model_tensors(engine.model)] == addresses
        assert all(torch.equal(a, b) for a, b in zip(weights_of(engine), before))
    finally:
        engine.unload()
    assert engine.kv_pool.stats().in_use_pages == 0


def test_an_embedding_after_the_weights_left_brings_them_back(gguf_file):
    engine = make_engine(gguf_file, movable=True)
    try:
        expected = engine.embed(["a cat"]).vectors
        engine.weights_to_host()
        assert engine.embed(["a cat"]).vectors == expected
    finally:
        engine.unload()


def test_the_broker_ladder_takes_the_weights_before_it_unloads(gguf_file):
    engine = make_engine(gguf_file, movable=True)
    broker = Broker(KvcachedConfig(backend="host"))
    register_engine(broker, engine)
    try:
        ask(engine, PROMPT)
        held = engine.memory().total_bytes
        got = broker.reclaim(target_bytes=held)
        steps = [e.step for e in broker.events.recent()]
        assert "weights_to_host" in steps and "unload" not in steps, steps
        assert got >= held and engine.state is ModelState.PAUSED
        assert ask(engine, PROMPT)[0]                        # ready: answers with no reload
    finally:
        broker.close()
        engine.unload()


def test_an_engine_without_the_rung_is_unloaded_by_the_next_one(gguf_file):
    engine = make_engine(gguf_file, movable=False)
    broker = Broker(KvcachedConfig(backend="host"))
    register_engine(broker, engine)
    try:
        ask(engine, PROMPT)
        assert engine.weights_to_host() == 0 and engine.state is ModelState.LOADED
        broker.reclaim(target_bytes=engine.memory().total_bytes)
        steps = [e.step for e in broker.events.recent()]
        assert steps[-1] == "unload" and engine.state is ModelState.UNLOADED, steps
    finally:
        broker.close()
        engine.unload()


def test_the_host_buffer_made_ahead_is_the_one_the_step_copies_into(gguf_file):
    """On CUDA the engine makes the weights' host buffer right after the load (pinning it
    when another application waits for the GPU was most of the step: 1.2 s of 1.35 s for
    2.3 GiB on the H100); the step then allocates nothing, and it comes back bit-exact."""
    engine = make_engine(gguf_file, movable=True)
    try:
        expected, _ = ask(engine, PROMPT)
        rung = engine.weights
        assert rung.arena.staging_bytes == 0                  # on the CPU the engine does not
        rung.prepare_ahead()
        rung._preparing.join()
        staged = rung.arena.staging_bytes
        assert staged >= rung.arena.nbytes
        assert engine.memory().staging_host_bytes >= staged     # reported: host memory it holds
        buffer = rung.arena._staging.get(0).data_ptr()
        assert engine.weights_to_host() > 0
        assert rung.arena.staging_bytes == staged and rung.arena._staging.get(0).data_ptr() == buffer
        assert ask(engine, PROMPT)[0] == expected
    finally:
        engine.unload()
