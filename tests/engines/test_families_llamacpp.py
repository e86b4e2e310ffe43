"""Every family the torch engine serves, against llama.cpp on the very same file.

For each case of tiny_families.FAMILY_CASES (Llama with YaRN, Mistral with a
sliding window, Mixtral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3, Phi-3
with LongRoPE and partial rotation, StarCoder2): a random-weight GGUF written
with the family's real tensor names and metadata keys is read back into the
same config (the loader reads what real files say), and llama.cpp
(llama-cpp-python, use_extra_bufts off) runs it as the reference:

- prefill logits at every position within BOUND of llama.cpp's, relative to
  the largest |logit| (float32 weights and KV on both sides: what differs is
  summation order, ~1e-6; the bound leaves room for llama.cpp's tanh and expf
  approximations and its f16 GELU table);
- the first 16 greedy tokens equal, ours from a prefill and one-token decode
  steps as the engine runs them.

The prompt is longer than the sliding windows (6) and than Phi-3's and YaRN's
original contexts, so windows, local RoPE bases and long factors all act.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_families import FAMILY_CASES, random_state, write_family_gguf  # noqa: E402

from engines.torch.load.gguf_loader import load_gguf  # noqa: E402
from engines.torch.model.attention import ContiguousKV  # noqa: E402

N_CTX = 128
NUM_GREEDY = 16
PROMPT = [int(i) for i in np.random.RandomState(3).randint(0, 256, 40)]
# max |ours - llama.cpp| / max |llama.cpp|, per family: float32 on both sides everywhere.
BOUND = {name: 2e-4 for name in FAMILY_CASES}
BOUND.update({"gemma2": 1e-3, "gemma3": 1e-3, "starcoder2": 1e-3})   # ggml's GELU goes through an f16 table


def float32_view(value):
    """A config's values as a GGUF stores them (float32), for comparison."""
    if dataclasses.is_dataclass(value):
        return tuple(float32_view(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, tuple):
        return tuple(float32_view(v) for v in value)
    return float(np.float32(value)) if isinstance(value, float) else value


def llamacpp_run(path: Path) -> tuple[np.ndarray, list[int]]:
    """(prefill logits [T, V], 16 greedy tokens) from llama.cpp."""
    pytest.importorskip("llama_cpp")
    from engines.llamacpp.native import plain_llama   # use_extra_bufts really off (AMX)
    llm = plain_llama(str(path), n_ctx=N_CTX, n_threads=2, logits_all=True, verbose=False,
                      type_k=0, type_v=0)             # float32 KV, as ours
    llm.eval(PROMPT)
    logits = np.array(llm.scores[:len(PROMPT)])
    tokens = []
    for _ in range(NUM_GREEDY):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return logits, tokens


def torch_run(model) -> tuple[np.ndarray, list[int]]:
    cfg = model.cfg
    kv = ContiguousKV(cfg.num_layers, 1, cfg.num_kv_heads, N_CTX, cfg.head_dim, torch.float32)
    n = len(PROMPT)
    tokens = []
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT]), torch.arange(n)[None], kv)[0]
        step = logits[-1]
        for i in range(NUM_GREEDY):
            tokens.append(int(step.argmax()))
            step = model(torch.tensor([[tokens[-1]]]), torch.tensor([[n + i]]), kv)[0, -1]
    return logits.numpy(), tokens


@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_family_matches_llamacpp(tmp_path, name):
    cfg, extra = FAMILY_CASES[name]
    path = write_family_gguf(tmp_path / f"{name}.gguf", cfg, extra, random_state(cfg, seed=len(name)))
    model, _ = load_gguf(path, dtype=torch.float32)
    assert float32_view(model.cfg) == float32_view(cfg), "the loader read the family's metadata into another config"
    model.fit_context(N_CTX)                      # LongRoPE picks its factors by the context, as llama.cpp
    ours, ours_tokens = torch_run(model)
    ref, ref_tokens = llamacpp_run(path)
    error = np.abs(ours - ref).max() / np.abs(ref).max()
    assert error < BOUND[name], f"{name}: relative logit error {error:.2e}"
    assert ours_tokens == ref_tokens
