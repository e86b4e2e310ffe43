"""Decode graphs the load leaves pending are captured while the serving loop is idle,
on a slot that holds no cached prefix, without changing what the model answers.

On CUDA, TorchEngine.load captures one bucket and leaves the rest in
runner.pending (tests/gpu/test_torch_warmup_gpu.py checks that on the GPU). On
this CPU nothing is captured, so the test hands the runner pending buckets
itself; the capture runs the real decode step (eager here) on the chosen slot.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from tiny_gguf import TINY  # noqa: E402

from engines.base import ModelInfo  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.torch.engine import TorchEngine  # noqa: E402
from engines.types import GenerateRequest, RequestKind, SamplingParams  # noqa: E402
from kvcached.config import KvcachedConfig  # noqa: E402
from kvcached.standalone import standalone_pool  # noqa: E402


def generate(engine: TorchEngine, text: str) -> str:
    request = GenerateRequest(kind=RequestKind.COMPLETION, prompt=text,
                              sampling=SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    return "".join(chunk.text for chunk in engine.generate(request))


def wait_until(done, timeout_s: float = 30.0) -> None:
    """Poll done() until it holds or timeout_s passed (the caller's assertions then say which)."""
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def tiny_engine(slots: int) -> TorchEngine:
    """The tiny synthetic model on the host backend, not yet loaded."""
    return TorchEngine(ModelInfo(name="tiny", path="", source="synthetic",
                                 metadata={"config": TINY.replace(max_context=128)}),
                       EngineConfig(torch_num_slots=slots, torch_max_context=128, torch_prefill_chunk=64),
                       standalone_pool(KvcachedConfig(page_size=64 << 10, reserve_pages=0)))


def test_pending_graphs_are_captured_when_idle_on_an_empty_slot() -> None:
    engine = tiny_engine(slots=3)
    engine.load()
    try:
        runner = engine.loop.runner
        assert runner.pending == []                      # nothing is captured on the CPU
        assert list(engine.load_phases) == ["read", "kv", "runner"]   # no compile or capture here
        assert all(s > 0 for s in engine.load_phases.values())
        first = generate(engine, "abc abc abc")          # leaves its prefix cached in a slot
        cache = engine.loop.scheduler.prefix_cache
        cached = {i for i, s in enumerate(cache.slots) if s.tokens}
        assert cached
        used: list[tuple[tuple[int, int], int]] = []
        capture = runner._capture
        runner._capture = lambda key, slot: (used.append((key, slot)), capture(key, slot))[1]
        runner.pending = [(1, 0), (2, 0)]                # what a CUDA load leaves
        assert generate(engine, "xyz") is not None       # the loop turns idle after this one
        wait_until(lambda: not runner.pending)
        assert runner.pending == [] and [key for key, _ in used] == [(1, 0), (2, 0)]
        cached_now = {i for i, s in enumerate(cache.slots) if s.tokens}
        assert all(slot not in cached_now for _, slot in used)   # never on a slot holding a prefix
        assert generate(engine, "abc abc abc") == first  # the cached prefix still answers the same
    finally:
        engine.unload()


def test_a_request_right_after_the_load_never_waits_for_a_capture() -> None:
    """The loop is idle the moment the load ends; the request that loaded the model comes a
    moment later. It runs first, and the pending graphs wait for CAPTURE_AFTER_IDLE_S of
    quiet after it (on the GPU the first of them compiles the model: seconds to a minute)."""
    from engines.torch.serve.idle_work import CAPTURE_AFTER_IDLE_S

    engine = tiny_engine(slots=2)
    engine.load()
    try:
        runner = engine.loop.runner
        captured_at: list[float] = []
        capture = runner._capture
        runner._capture = lambda key, slot: (captured_at.append(time.monotonic()), capture(key, slot))[1]
        runner.pending = [(1, 0)]                        # what a CUDA load leaves
        engine.loop.idle_since = time.monotonic()        # as the load's end sets it
        time.sleep(0.2)                                  # the loaded model's request, a moment later
        assert captured_at == []
        generate(engine, "abc")
        answered_at = time.monotonic()
        assert captured_at == []                         # nothing captured before or during it
        wait_until(lambda: not runner.pending)
        assert runner.pending == [] and len(captured_at) == 1
        assert captured_at[0] - answered_at >= CAPTURE_AFTER_IDLE_S - 0.1   # after the quiet, not at once
    finally:
        engine.unload()


def test_quiet_tasks_run_once_after_the_quiet_period_and_before_captures() -> None:
    """The engine's one-shot idle work (the weights' pinned buffer on the GPU) waits for the
    same quiet as the captures, runs once, and comes first; a failing task ends nothing."""
    from engines.torch.serve.idle_work import CAPTURE_AFTER_IDLE_S

    engine = tiny_engine(slots=2)
    engine.load()
    try:
        loop, runner = engine.loop, engine.loop.runner
        order: list[tuple[str, float]] = []
        capture = runner._capture
        runner._capture = lambda key, slot: (order.append(("capture", time.monotonic())), capture(key, slot))[1]
        runner.pending = [(1, 0)]
        asked = time.monotonic()
        loop.idle_since = asked
        loop.when_quiet(lambda: 1 / 0)                   # logged, the worker goes on
        loop.when_quiet(lambda: order.append(("task", time.monotonic())))
        wait_until(lambda: not runner.pending)
        assert [name for name, _ in order] == ["task", "capture"]
        assert order[0][1] - asked >= CAPTURE_AFTER_IDLE_S - 0.1
        assert generate(engine, "abc") is not None       # the worker still serves
        loop.when_quiet(lambda: order.append(("later", time.monotonic())))   # added while it waits
        wait_until(lambda: len(order) >= 3)
        assert [name for name, _ in order] == ["task", "capture", "later"]
    finally:
        engine.unload()


def test_no_capture_without_an_empty_slot() -> None:
    from engines.torch.serve.prefix_cache import PrefixCache

    cache = PrefixCache(2)
    cache.take(0, [1, 2, 3], 0)
    cache.release(0, [1, 2, 3])
    assert cache.empty_slot() == 1
    cache.take(1, [4], 0)
    assert cache.empty_slot() is None


def test_a_warm_up_that_waits_for_the_captures_does_not_wait_for_the_quiet() -> None:
    """finish_background_work (kernel warm-up, `ebbtide warmup`) asks for the idle work at once."""
    from engines.torch.serve.idle_work import CAPTURE_AFTER_IDLE_S

    engine = tiny_engine(slots=2)
    engine.load()
    try:
        time.sleep(CAPTURE_AFTER_IDLE_S + 0.5)            # the load's own idle work done: the worker waits
        engine.loop.idle_since = time.monotonic() + 3600   # as if a request had just ended, for an hour
        engine.loop.runner.pending = [(1, 0)]
        assert engine.finish_background_work(10.0)
    finally:
        engine.unload()


def test_a_failed_idle_capture_is_logged_with_its_stack_and_the_model_serves_on(caplog) -> None:
    """A capture that fails for a reason other than memory (the H200 exhaustion run's
    "operation not permitted when stream is capturing") is logged with the call that
    failed; the pending buckets are dropped and requests are answered as before."""
    import logging

    engine = tiny_engine(slots=3)
    engine.load()
    try:
        runner = engine.loop.runner
        first = generate(engine, "abc abc")

        def unsupported_inside_capture(key, slot):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

        runner._capture = unsupported_inside_capture
        runner.pending = [(2, 0)]
        with caplog.at_level(logging.WARNING, logger="engines.torch.serve.idle_work"):
            assert generate(engine, "xyz") is not None
            wait_until(lambda: "capturing a pending decode graph failed" in caplog.text)
        failed = [r for r in caplog.records if "capturing a pending decode graph failed" in r.getMessage()]
        assert failed and failed[0].exc_info is not None
        assert "unsupported_inside_capture" in caplog.text            # the failing call's frame
        assert generate(engine, "abc abc") == first
    finally:
        engine.unload()


def test_an_idle_model_does_not_wait_behind_another_models_compile() -> None:
    """While another model compiles its step (graph_capture's compile turn held elsewhere), an
    idle model's compiled captures wait, outside its step lock: requests are served meanwhile;
    the capture runs once the other compile is done."""
    from engines.torch.serve import graph_capture

    engine = tiny_engine(slots=3)
    engine.load()
    try:
        runner = engine.loop.runner
        runner.is_compiled = True                 # its captures would go through a compiled step
        used: list[tuple[int, int]] = []
        capture = runner._capture
        runner._capture = lambda key, slot: (used.append(key), capture(key, slot))[1]
        graph_capture._COMPILED_STEPS.acquire()   # another model compiling
        try:
            runner.pending = [(2, 0)]
            engine.loop.hurry()                   # no quiet period: the worker tries at once
            started = time.monotonic()
            assert generate(engine, "abc abc") is not None
            assert time.monotonic() - started < 10
            time.sleep(2 * 1.0)                   # two of the idle loop's retries
            assert used == [] and runner.pending == [(2, 0)]
        finally:
            graph_capture._COMPILED_STEPS.release()
        wait_until(lambda: not runner.pending)
        assert used == [(2, 0)]
    finally:
        engine.unload()
