"""End to end: tiny random-weight Gemma 3 and Gemma 2 served by the torch engine with a
window of 16 tokens and 64 KiB host pages, so the sliding layers' pages behind the
window really go back to the pool over a 200-token context. The greedy tokens are
those of one plain forward over a contiguous cache (what the engine answered before
the giveback), the second turn of the conversation reuses its prefix where the
window allows and recomputes it where not, and the cached prefix survives an
unload to disk and back."""
from __future__ import annotations

import pytest
import torch

from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.torch.engine import TorchEngine
from engines.torch.model.attention import ContiguousKV
from engines.torch.model.configs import sliding_pattern
from engines.types import GenerateRequest, RequestKind, SamplingParams
from kvcached.config import KvcachedConfig
from kvcached.standalone import standalone_pool
from tiny_families import FAMILY_CASES, random_state, write_family_gguf

WINDOW = 16
CASES = {
    "gemma3": dict(layer_windows=sliding_pattern(7, WINDOW, 6)),
    "gemma2": dict(layer_windows=sliding_pattern(3, WINDOW, 2)),
}
PROMPT = "The tide came in over the flats and the gulls rose. " * 3   # ~160 tokens
NEW_TOKENS = 40


def tiny_windowed(tmp_path, name: str, **config) -> TorchEngine:
    cfg, extra = FAMILY_CASES[name]
    cfg = cfg.replace(**CASES[name])
    path = write_family_gguf(tmp_path / f"{name}.gguf", cfg, {**extra, "attention.sliding_window": WINDOW},
                             random_state(cfg, seed=7))
    values = dict(torch_num_slots=2, torch_max_context=256, torch_prefill_chunk=48,
                  torch_llamacpp_numerics=False)
    values.update(config)
    engine = TorchEngine(ModelInfo(name=name, path=str(path)), EngineConfig(**values),
                         standalone_pool(KvcachedConfig(page_size=64 << 10, reserve_pages=0)))
    engine.load()
    return engine


def greedy(engine: TorchEngine, prompt: str, max_tokens: int = NEW_TOKENS) -> tuple[list[int], object]:
    request = GenerateRequest(kind=RequestKind.COMPLETION, prompt=prompt,
                              sampling=SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    chunks = list(engine.generate(request))
    return [t for c in chunks for t in c.token_ids], chunks[-1].usage


@torch.inference_mode()
def plain_greedy(engine: TorchEngine, ids: list[int], max_tokens: int = NEW_TOKENS) -> list[int]:
    """Greedy tokens of the same model over one contiguous cache that keeps every key."""
    model, cfg = engine.model, engine.model.cfg
    kv = ContiguousKV(cfg.num_layers, 1, cfg.num_kv_heads, len(ids) + max_tokens, cfg.head_dim, torch.float32)
    step = model(torch.tensor([ids]), torch.arange(len(ids))[None], kv)[0, -1]
    out = []
    for i in range(max_tokens):
        out.append(int(step.argmax()))
        step = model(torch.tensor([[out[-1]]]), torch.tensor([[len(ids) + i]]), kv)[0, -1]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_same_greedy_tokens_with_the_window_given_back(tmp_path, name):
    engine = tiny_windowed(tmp_path, name, torch_num_slots=1)   # every prompt in the one slot
    try:
        ids = engine.text.tokenize(PROMPT)
        assert len(ids) + NEW_TOKENS > 8 * WINDOW
        tokens, _ = greedy(engine, PROMPT)
        assert tokens == plain_greedy(engine, ids)
        store = engine.store
        slot = next(i for i, s in enumerate(engine.loop.scheduler.prefix_cache.slots) if s.tokens)
        assert store.window_floor(slot) > 0                       # pages really went back
        assert store.held_bytes < store.layout.mapped_bytes_for(len(ids) + NEW_TOKENS)
        # What the broker is asked for books the window, not the whole context, and holds what was held.
        booked = engine.budget.ledger.booking_pages(len(ids) + NEW_TOKENS)
        assert store.held_bytes <= booked * store.layout.page_size < store.layout.mapped_bytes_for(len(ids) + NEW_TOKENS)
        # The next turn extends the conversation: its prefix is reused where the window allows.
        follow = PROMPT + engine.text.detokenize(tokens) + " And then"
        again, usage = greedy(engine, follow, 8)
        assert again == plain_greedy(engine, engine.text.tokenize(follow), 8)
        assert usage.cached_tokens > 0
        # A prompt sharing only an early prefix: the window moved past it, so it is recomputed.
        short = PROMPT[:60] + " gulls"
        again, usage = greedy(engine, short, 8)
        assert again == plain_greedy(engine, engine.text.tokenize(short), 8)
    finally:
        engine.unload()


def test_a_cached_prefix_with_a_moved_window_survives_the_disk(tmp_path):
    config = dict(kv_disk_dir=str(tmp_path / "kv"), kv_disk_models=("gemma3",))
    engine = tiny_windowed(tmp_path, "gemma3", **config)
    try:
        tokens, _ = greedy(engine, PROMPT)
        follow = PROMPT + engine.text.detokenize(tokens) + " And then"
        expected = plain_greedy(engine, engine.text.tokenize(follow), 8)
    finally:
        engine.unload()
    engine.load()
    try:
        slots = engine.loop.scheduler.prefix_cache.slots
        restored = next(i for i, s in enumerate(slots) if s.tokens)
        assert engine.store.window_floor(restored) > 0
        again, usage = greedy(engine, follow, 8)
        assert again == expected and usage.cached_tokens > 0
    finally:
        engine.unload()
