"""Issue 5 item 6: on the default model on the CPU, greedy decoding with the torch
model matches llama.cpp's greedy tokens (llama-cpp-python on the same file).

Two tests against the real llama.cpp on the real SmolLM2-135M Q4_1 file:

- `test_greedy_matches_llamacpp`: the first 32 greedy tokens agree on at least 8
  of 10 varied prompts. Our tokens come from one batched run (ragged prefill,
  then 32 decode steps for all prompts at once); llama.cpp's from its own
  prefill + one-token decode.
- `test_confident_tokens_agree`: teacher-forced along llama.cpp's greedy path on
  other prompts (CJK, Cyrillic, accents, C, chat), our logits equal llama.cpp's
  bit for bit, and our top token equals its top token where it is decided.

How the prompts were chosen: the ten in RAW/CHAT were written down before
anything was run (2026-11-23, 04:15 UTC) to cover prose, Python, JavaScript,
JSON, a list, French, Greek (raw) and a question, an SQL instruction, a list
instruction (chat-templated), and were not changed after seeing results.
(The previous set had been picked from the 16 of 40 prompts that happened to
match; it is gone.)

What was measured on these ten, first differing token per prompt:
- plain float32 model (before): 2/10 matched [14, 11, 32, 32, 20, 8, 5, 29, 9, 25];
- llama.cpp's activation rounding (Q8_1/Q8_0) and f16 KV/attention emulated,
  summed in torch's order: 3/10 [1, 6, 32, 32, 20, 32, 5, 29, 9, 25];
- bit-exact llama.cpp CPU numerics (engines/torch/ggml_*.py): 10/10.
Why only bit-exact works: llama.cpp's output is chaotic in the last bit. With
its 8-bit activation rounding emulated, moving every attn_norm weight of our
model by one ulp changed the logits by 0.19 on average (the plain float32 model:
1e-5), as much as the two libraries differed. Every rounding boundary crossed
flips a quantized activation, which flips more in the next layer. So the torch
engine's CPU path reproduces llama.cpp's kernels' summation orders (see
engines/torch/ggml/dot.py, ggml_math.py, ggml_layers.py); its prefill logits
equal llama.cpp's exactly (tests/engines/test_ggml_numerics.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from text_fixtures import gguf_meta, tokenizer  # noqa: E402,F401

from engines.text.chat_template import ChatTemplate  # noqa: E402
from engines.torch.model.attention import ContiguousKV  # noqa: E402
from engines.torch.load.gguf_loader import bundled_model_path, load_gguf  # noqa: E402
from engines.torch.ggml.numerics import HEAD_EXACT_WITHIN, kv_cache_dtype  # noqa: E402

NUM_TOKENS = 32
RAW = [
    "The old lighthouse keeper climbed the stairs every evening, and",
    "import json\n\ndef load_config(path):\n    ",
    "function debounce(fn, delay) {\n  let timer;\n",
    '{"name": "Alice", "email": "alice@example.com", "roles": [',
    "Things to pack for a camping trip:\n- tent\n- ",
    "Le café était fermé, alors nous sommes allés à la boulangerie où",
    "Στην αρχαία Ελλάδα, οι φιλόσοφοι",
]
CHAT = [
    "Why is the sky blue?",
    "Write a short SQL query that counts orders per customer.",
    "List three benefits of regular exercise.",
]
HARD_RAW = ["東京は日本の首都です。", "Привет, как дела?", "Les élèves ont étudié 日本語 et 🤗 emoji",
            "#include <stdio.h>\n\nint main(void) {\n", "Once upon a time, in a small village,"]
HARD_CHAT = ["Write a haiku about the sea.", "Translate 'bonjour' to English.", "¿Cómo estás?"]


def open_llama_cpp(logits_all: bool):
    llama_cpp = pytest.importorskip("llama_cpp")
    from engines.llamacpp.native import plain_llama  # use_extra_bufts really off (AMX)
    return plain_llama(str(bundled_model_path()), n_ctx=512, n_batch=512,
                           n_threads=2, logits_all=logits_all, verbose=False)


@pytest.fixture(scope="module")
def llama_cpp_model():
    return open_llama_cpp(logits_all=False)   # keeping every position's logits halves its speed


@pytest.fixture(scope="module")
def model():
    model, _ = load_gguf(bundled_model_path(), "cpu", torch.float32)
    return model


def prompt_ids(tokenizer, gguf_meta, raw: list[str], chat: list[str]) -> list[list[int]]:
    template = ChatTemplate.from_gguf(gguf_meta)
    texts = raw + [template.render([{"role": "user", "content": c}]) for c in chat]
    return [tokenizer.encode(t, add_special=True) for t in texts]


def our_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """All prompts at once: a ragged prefill (pads placed after each row's end), then
    n batched decode steps."""
    cfg = model.cfg
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    positions = torch.stack([torch.arange(width).clamp(max=int(n_)) for n_ in lengths])
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    kv = ContiguousKV(cfg.num_layers, len(prompts), cfg.num_kv_heads, width + n, cfg.head_dim,
                      kv_cache_dtype(model))
    out = []
    with torch.inference_mode():
        logits = model(ids, positions, kv, logit_index=lengths - 1)
        for i in range(n):
            out.append(logits[:, -1].argmax(-1))
            logits = model(out[-1][:, None], (lengths + i)[:, None], kv)
    return torch.stack(out, 1).tolist()


def llamacpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.timeout(900)   # bit-exact emulation: ~1.5 min alone, more on a busy CPU
def test_greedy_matches_llamacpp(model, llama_cpp_model, tokenizer, gguf_meta):
    prompts = prompt_ids(tokenizer, gguf_meta, RAW, CHAT)
    assert len(prompts) == 10
    ours = our_greedy(model, prompts, NUM_TOKENS)
    agree = [first_difference(o, llamacpp_greedy(llama_cpp_model, p, NUM_TOKENS)) for o, p in
             zip(ours, prompts)]
    matched = sum(a == NUM_TOKENS for a in agree)
    assert matched >= 8, f"first differing token per prompt: {agree}"


def test_confident_tokens_agree(model, llama_cpp_model, tokenizer, gguf_meta):
    """Teacher-forced on llama.cpp's greedy path: where llama.cpp's top-1 leads
    by more than 1.5 logits, ours picks the same token. llama.cpp's work runs
    first, ours in one batched forward after: alternating the two libraries'
    spinning thread pools on a small CPU slows both several-fold."""
    prompts = prompt_ids(tokenizer, gguf_meta, HARD_RAW, HARD_CHAT)
    scorer = open_llama_cpp(logits_all=True)
    paths, refs = [], []
    for prompt in prompts:
        path = prompt + llamacpp_greedy(llama_cpp_model, prompt, 16)
        scorer.reset()
        scorer.eval(path)
        paths.append(path)
        refs.append(np.array(scorer.scores[len(prompt) - 1:len(path)]))
    ours_all = teacher_forced_logits(model, paths)
    checked = disagreed = 0
    for prompt, path, ref, ours in zip(prompts, paths, refs, ours_all):
        ours = ours[len(prompt) - 1:len(path)]
        top2 = np.sort(ref, axis=1)[:, -2:]
        confident = top2[:, 1] - top2[:, 0] > 1.5
        checked += int(confident.sum())
        disagreed += int((ours.argmax(1) != ref.argmax(1))[confident].sum())
        # Both sides run these positions as one prefill, with the same kernels: the
        # logits near each row's top are the same bits, the rest within 1e-3.
        top = ref >= ref.max(1, keepdims=True) - HEAD_EXACT_WITHIN / 2
        assert np.array_equal(ours[top], ref[top]) and np.abs(ours - ref).max() < 1e-3
    assert checked > 50 and disagreed == 0, (checked, disagreed)


def teacher_forced_logits(model, paths: list[list[int]]) -> list[np.ndarray]:
    """Logits [len(path), V] of every path, from one ragged batched forward."""
    cfg = model.cfg
    width = max(map(len, paths))
    ids = torch.zeros(len(paths), width, dtype=torch.long)
    positions = torch.stack([torch.arange(width).clamp(max=len(p)) for p in paths])
    for b, p in enumerate(paths):
        ids[b, :len(p)] = torch.tensor(p)
    kv = ContiguousKV(cfg.num_layers, len(paths), cfg.num_kv_heads, width + 1, cfg.head_dim,
                      kv_cache_dtype(model))
    with torch.inference_mode():
        logits = model(ids, positions, kv).numpy()
    return [logits[b, :len(p)] for b, p in enumerate(paths)]
