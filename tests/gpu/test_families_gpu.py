"""Every family on the GPU: the same tiny GGUFs as tests/engines/test_families_llamacpp.py
(the CPU there matches llama.cpp), loaded on CUDA and served the way the engine
serves them: the Runner with its Triton decode attention (self-checked on each
family's layer specs: head dims, windows, soft-caps, partial RoPE) and CUDA
graphs over kvcached virtual KV. Float32 on the GPU (TF32 off) against the CPU
float32 model: logits of every decode step close, greedy tokens equal.

Run: PYTHONPATH=. python3 -m pytest -q tests/gpu/test_families_gpu.py
"""
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

PROMPTS = {0: list(range(3, 43)), 1: [7, 9, 11], 2: list(range(100, 123))}
STEPS = 16


def store_for(cfg, dtype):
    from kvcached.config import KvcachedConfig
    from kvcached.kv_cache.layout import KVShape
    from kvcached.kv_cache.manager import KVCache
    from kvcached.vmm import open_backend

    config = KvcachedConfig(backend="cuda", page_size=2 << 20, reserve_pages=0)
    return KvcachedStore(KVCache(open_backend(config), KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                                               dtype), 4, 256, config))


def serve(model, store, use_graphs: bool) -> torch.Tensor:
    runner = Runner(model, store, use_graphs=use_graphs, compile=False)
    if model.device.type == "cuda":
        assert runner.kv.use_triton, "the Triton kernel failed its self-check on this family"
    seqs = [Sequence(prompt=p, max_tokens=10 ** 6, slot=s) for s, p in PROMPTS.items()]
    out = []
    with torch.inference_mode():
        for seq in seqs:
            logits = runner.run(StepPlan(prefills=(PrefillChunk(seq, 0, len(seq.prompt)),)))[0]
            seq.num_computed = len(seq.prompt)
            seq.output.append(int(logits.argmax()))
        for _ in range(STEPS):
            logits = runner.run(StepPlan(decodes=tuple(seqs)))
            out.append(logits.float().cpu())
            for seq, tok in zip(seqs, logits.argmax(-1).tolist()):
                seq.num_computed += 1
                seq.output.append(tok)
    return torch.stack(out)                                  # [steps, B, V]


@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_family_serves_on_gpu_as_on_cpu(tmp_path, name):
    from engines.torch.serve.kv_access import StaticStore, kv_layout

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg, extra = FAMILY_CASES[name]
    path = write_family_gguf(tmp_path / f"{name}.gguf", cfg, extra, random_state(cfg, seed=len(name)))
    cpu, _ = load_gguf(path, "cpu", torch.float32)
    gpu, _ = load_gguf(path, "cuda", torch.float32)
    for m in (cpu, gpu):
        m.fit_context(256)
    layout = kv_layout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32, 4, 256, 2 << 20)
    ref = serve(cpu, StaticStore(layout, torch.float32, torch.device("cpu")), use_graphs=False)
    got = serve(gpu, store_for(cfg, torch.float32), use_graphs=True)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    error = ((got - ref).abs().max() / ref.abs().max()).item()
    assert error < 1e-3, f"{name}: relative logit error {error:.2e}"
