"""Sliding-window giveback on the GPU: a tiny random-weight Gemma 3 and Gemma 2 (window 6)
with a 4,096-token context, served by the Runner (Triton decode attention, CUDA graphs)
over kvcached CUDA pages, once with the sliding layers in a part of their own whose pages
behind the window go back (kvcached/kv_cache/window.py) and once with every layer kept
(the layout before). Same logits, bit for bit (the same kernels read the same keys at
other addresses), and the windowed cache really gave pages back."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
pytest.importorskip("gguf")
from tiny_families import FAMILY_CASES, random_state, write_family_gguf  # noqa: E402

from engines.torch.load.gguf_loader import load_gguf  # noqa: E402
from engines.torch.serve.kv_access import KvcachedStore  # noqa: E402
from engines.torch.serve.runner import Runner  # noqa: E402
from engines.torch.serve.scheduler import PrefillChunk, Sequence, StepPlan  # noqa: E402

CONTEXT, PROMPT, CHUNK, STEPS = 4096, 3000, 512, 16


def store(cfg, windowed: bool) -> KvcachedStore:
    from kvcached.config import KvcachedConfig
    from kvcached.kv_cache.layout import KVShape
    from kvcached.kv_cache.manager import KVCache
    from kvcached.vmm import open_backend

    config = KvcachedConfig(backend="cuda", page_size=2 << 20, reserve_pages=0)
    windows = tuple(cfg.window(i) for i in range(cfg.num_layers)) if windowed else ()
    shape = KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32, windows)
    return KvcachedStore(KVCache(open_backend(config), shape, 2, CONTEXT, config))


def serve(path: Path, kv: KvcachedStore) -> torch.Tensor:
    """Greedy decode logits after a chunked prefill; the runner's close frees the model."""
    model, _ = load_gguf(path, "cuda", torch.float32)
    model.fit_context(CONTEXT)
    runner = Runner(model, kv, use_graphs=True, compile=False)
    assert runner.kv.use_triton
    prompt = [(i * 37) % 250 + 3 for i in range(PROMPT)]
    seq = Sequence(prompt=prompt, max_tokens=10 ** 6, slot=0)
    out = []
    with torch.inference_mode():
        for start in range(0, PROMPT, CHUNK):
            logits = runner.run(StepPlan(prefills=(PrefillChunk(seq, start, min(PROMPT, start + CHUNK)),)))
            seq.num_computed = min(PROMPT, start + CHUNK)
        seq.output.append(int(logits[0].argmax()))
        for _ in range(STEPS):
            logits = runner.run(StepPlan(decodes=(seq,)))
            out.append(logits.float().cpu())
            seq.num_computed += 1
            seq.output.append(int(logits.argmax(-1)[0]))
    runner.close()
    return torch.stack(out)


@pytest.mark.parametrize("name", ["gemma3", "gemma2"])
def test_window_giveback_serves_the_same_logits(tmp_path, name):
    cfg, extra = FAMILY_CASES[name]
    cfg = cfg.replace(max_context=CONTEXT)
    path = write_family_gguf(tmp_path / f"{name}.gguf", cfg, extra, random_state(cfg, seed=3))
    windowed, kept = store(cfg, True), store(cfg, False)
    try:
        got, want = serve(path, windowed), serve(path, kept)
        assert windowed.window_floor(0) > 0
        assert windowed.held_bytes < kept.held_bytes
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        windowed.close()
        kept.close()
