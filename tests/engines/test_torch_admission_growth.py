"""An answer without max_tokens books its KV as it grows, not the whole context
(engines/torch/serve/kv_budget.py): the prompt and `grow_tokens` ahead, a chunk
more each time the next token would pass the booking. When the broker cannot
grant the next chunk the answer pauses until memory frees, and past the
admission timeout ends with finish_reason "length", keeping what it produced.

Real parts, as in test_torch_admission.py: a TorchEngine on the tiny random-weight
Llama (4 KV heads: 16 tokens a 64 KiB page) with a 128-token context, its KV in
kvcached host-backend pages, the real Broker (the model's max_bytes binds) and
broker_client. The engine's budget grows a page (16 tokens) at a time here
instead of GROW_TOKENS, so a whole context is a few steps on this CPU.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_gguf import TINY  # noqa: E402

from engines.base import ModelInfo  # noqa: E402
from engines.broker_client import register_engine, unregister_engine  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.torch.engine import TorchEngine  # noqa: E402
from engines.types import FinishReason, GenerateRequest, RequestKind, SamplingParams  # noqa: E402
from kvcached.broker import Broker  # noqa: E402
from kvcached.config import KvcachedConfig  # noqa: E402
from kvcached.standalone import standalone_pool  # noqa: E402

PAGE = 64 << 10            # 16 tokens of this model's float32 KV (4 KiB a token)
TOKENS_PER_PAGE = 16
CTX = 128                  # the whole context: 8 pages
PROMPT = 12
GROW = 16                  # the budget's grow_tokens here: a page (GROW_TOKENS in the daemon)
MODEL = TINY.replace(num_kv_heads=4, max_context=CTX)


def make_engine(timeout_s: float) -> TorchEngine:
    engine = TorchEngine(ModelInfo(name="grow", path="", source="synthetic",
                                   metadata={"config": MODEL}),
                         EngineConfig(torch_num_slots=2, torch_max_context=CTX, torch_prefill_chunk=64,
                                      max_queue=16, admission_timeout_s=timeout_s),
                         standalone_pool(KvcachedConfig(page_size=PAGE, reserve_pages=0)))
    engine.load()
    assert len(engine.tokenize(prompt(0))) == PROMPT
    engine.budget.grow_tokens = GROW
    return engine


def prompt(i: int) -> str:
    return chr(ord("a") + i) + "xyz xyz uvw"   # 12 byte tokens, a distinct first one


def open_ended(i: int) -> GenerateRequest:
    """What the HTTP layer makes of a request without max_tokens (app/server/sampling.py)."""
    return GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt(i),
                           sampling=SamplingParams(temperature=0, max_tokens=CTX, open_ended=True,
                                                   ignore_eos=True))


def bounded(i: int, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt(i),
                           sampling=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))


class Watch:
    """Samples, while requests run, what the broker counts for the model, its KV booked
    beyond what is mapped, how many sequences run and whether one pauses for memory."""

    def __init__(self, engine: TorchEngine, handle) -> None:
        self.engine, self.handle = engine, handle
        self.counted: list[int] = []
        self.booked: list[int] = []
        self.running: list[int] = []
        self.paused: list[bool] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        broker = self.handle.broker
        while not self._stop.wait(0.002):
            with broker.between_reclaims():
                self.counted.append(self.handle.view().held_bytes)
            self.booked.append(self.engine.memory().kv_booked_bytes)
            running = list(self.engine.loop.scheduler.running)
            self.running.append(len(running))
            self.paused.append(any(s.memory_wait_since is not None for s in running))

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def last_chunks(engine: TorchEngine, requests: list[GenerateRequest]) -> list[object]:
    """Queued at once, read on their own threads: each one's last chunk or exception."""
    streams = [engine.generate(r) for r in requests]
    results: list[object] = [None] * len(streams)

    def read(k: int) -> None:
        try:
            results[k] = list(streams[k])[-1]
        except Exception as exc:   # noqa: BLE001 - the test asserts on it
            results[k] = exc

    threads = [threading.Thread(target=read, args=(k,)) for k in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def serve(engine: TorchEngine, kv_cap_pages: int | None):
    broker = Broker(KvcachedConfig(headroom_bytes=0, reclaim_hysteresis_bytes=0))
    cap = None if kv_cap_pages is None else engine.memory().weights_bytes + kv_cap_pages * PAGE
    return broker, register_engine(broker, engine, max_bytes=cap), cap


def close(engine: TorchEngine, broker: Broker, handle) -> None:
    unregister_engine(handle, engine)
    broker.close()
    thread = threading.Thread(target=engine.unload, daemon=True)   # never hang the suite
    thread.start()
    thread.join(30)


@pytest.mark.timeout(300)
def test_an_answer_without_max_tokens_books_a_chunk_ahead_and_runs_to_the_end_of_the_context():
    engine = make_engine(timeout_s=60)
    broker, handle, _ = serve(engine, None)
    try:
        with Watch(engine, handle) as watch:
            (last,) = last_chunks(engine, [open_ended(0)])
    finally:
        close(engine, broker, handle)
    assert not isinstance(last, BaseException), last
    assert last.finish_reason is FinishReason.LENGTH and last.usage.completion_tokens == CTX - PROMPT
    # Never more than a chunk promised beyond what is mapped (a whole-context booking: 7 pages).
    chunk_pages = -(-(GROW + 2 * TOKENS_PER_PAGE) // TOKENS_PER_PAGE)
    assert watch.booked and max(watch.booked) <= chunk_pages * PAGE < (CTX // TOKENS_PER_PAGE - 1) * PAGE


@pytest.mark.timeout(300)
def test_an_answer_that_cannot_grow_pauses_until_memory_frees_then_finishes():
    """Room for the whole context once: an 80-token answer (6 pages) and an open-ended
    one (2 pages) run side by side (a whole-context booking could not), the open-ended
    one pauses when its next page does not fit, and goes on to the end of the context
    once the other has ended."""
    engine = make_engine(timeout_s=60)
    broker, handle, cap = serve(engine, CTX // TOKENS_PER_PAGE)
    try:
        with Watch(engine, handle) as watch:
            grows, fixed = last_chunks(engine, [open_ended(0), bounded(1, 80)])
    finally:
        close(engine, broker, handle)
    for r in (grows, fixed):
        assert not isinstance(r, BaseException), r
    assert fixed.finish_reason is FinishReason.LENGTH and fixed.usage.completion_tokens == 80
    assert grows.finish_reason is FinishReason.LENGTH and grows.usage.completion_tokens == CTX - PROMPT
    assert max(watch.running) == 2 and any(watch.paused)
    assert max(watch.counted) <= cap


@pytest.mark.timeout(200)
def test_an_answer_out_of_budget_past_the_timeout_ends_with_length_and_keeps_its_tokens():
    engine = make_engine(timeout_s=0.5)
    broker, handle, cap = serve(engine, 2)      # the first chunk fits (2 pages), the second never
    try:
        started = time.monotonic()
        with Watch(engine, handle) as watch:
            chunks = list(engine.generate(open_ended(0)))
        waited = time.monotonic() - started
        after = list(engine.generate(bounded(1, 4)))[-1]   # what fits still runs
    finally:
        close(engine, broker, handle)
    last = chunks[-1]
    assert last.finish_reason is FinishReason.LENGTH
    # It stopped where its booking ended: the prompt and GROW tokens in the KV, and the
    # token sampled from the last of them.
    assert last.usage.completion_tokens == GROW + 1
    assert sum(len(c.token_ids) for c in chunks) == GROW + 1
    assert waited >= 0.5 and any(watch.paused) and max(watch.counted) <= cap
    assert after.finish_reason is FinishReason.LENGTH and after.usage.completion_tokens == 4
