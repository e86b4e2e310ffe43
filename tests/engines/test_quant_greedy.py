"""Issue 16, end to end on the CPU: the bundled SmolLM2-135M requantized by
llama.cpp's own quantizer to Q4_K_M, Q6_K and Q8_0, loaded by the torch engine
with its weights kept in their blocks (QuantLinear, QuantEmbedding, the tied
head sharing the embedding's blocks; llama.cpp numerics off: the float path),
greedy against llama.cpp (the same file, use_extra_bufts off) on 20 fixed
prompts, and the weights' bytes against the file's tensor bytes.

SmolLM2's width (576) is not a multiple of 256, so llama.cpp stores the
K-quant mixes' 576-wide rows in its fallbacks (Q5_0, Q5_1, Q8_0 ...): those
files exercise more types than their names say.

Why not every prompt matches to 32 tokens: llama.cpp rounds every activation to
8 bits before its quantized dot products and the float path does not, which is
chaotic in the last bit (tests/engines/test_model_greedy.py measured 2 of 10 on
the Q4_1 file this way). On this path a majority is out of reach:
the Q4_K_M file matched 3 of 20 prompts for all 32 tokens (see FILES). So the
test asserts the measured floor and, for every other prompt, that the first
divergence is a near tie in our own logits (llama.cpp's token within NEAR_TIE
of our top logit, teacher-forced on its path): a wrong weight (a row order, a
scale, a block type decoded wrong) would part early and by whole logits. The
bit-exact CPU path (engines.torch.ggml, numerics on) is what matches llama.cpp
token for token (tests/engines/test_model_greedy.py: 10/10). A greedy
comparison on the GPU against llama.cpp's CUDA build is not here yet (the GPU
machine has no llama-cpp-python; tests/gpu/test_quant_model_gpu.py compares
CUDA against this CPU float path instead).
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_model_greedy import CHAT, HARD_CHAT, HARD_RAW, RAW, llamacpp_greedy, prompt_ids  # noqa: E402
from text_fixtures import gguf_meta, tokenizer  # noqa: E402,F401

from engines.torch.load.gguf_loader import bundled_model_path, load_gguf, open_reader  # noqa: E402
from engines.torch.load.gguf_names import hf_name  # noqa: E402
from engines.torch.model.attention import ContiguousKV  # noqa: E402
from engines.torch.quant.modules import QuantEmbedding, QuantLinear  # noqa: E402

NUM_TOKENS = 32
EXTRA_RAW = ["SELECT name, COUNT(*) FROM orders", "The three laws of thermodynamics are"]
PROMPTS = (RAW, CHAT + HARD_CHAT, HARD_RAW + EXTRA_RAW)
# llama.cpp ftype -> (the file's name, prompts of 20 whose 32 greedy tokens must all match).
# Measured 2026-12-05 (float path against llama.cpp 0.3.36 on the CPU): Q4_K_M 3/20, first
# divergences [7, 14, 20, 32, 32, 15, 2, 7, 18, 32, 1, 2, 0, 0, 1, 0, 4, 18, 19, 5], every one
# a near tie (largest gap 0.54 logits); Q6_K 5/20 (largest gap 0.38); Q8_0 9/20 (0.26).
# Not a majority: see the module docstring.
FILES = {15: ("Q4_K_M", 2), 18: ("Q6_K", 2), 7: ("Q8_0", 2)}
# The first divergence must be a near tie: our logit of our token minus our logit of
# llama.cpp's token, at the step where they part.
NEAR_TIE = 1.0


@pytest.fixture(scope="session")
def requantized(tmp_path_factory) -> dict[int, Path]:
    """The bundled Q4_1 file requantized once per session by llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    folder = tmp_path_factory.mktemp("smollm2-requant")
    paths = {}
    for ftype, (label, _) in FILES.items():
        out = folder / f"SmolLM2-135M-Instruct.{label}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
        assert llama_cpp.llama_model_quantize(str(bundled_model_path()).encode(), str(out).encode(),
                                              ctypes.byref(params)) == 0, label
        paths[ftype] = out
    return paths


def file_weight_bytes(path: Path) -> int:
    """Bytes of the tensors the model takes (what a GPU would hold, as the file stores it)."""
    return sum(int(t.n_bytes) for t in open_reader(path).tensors if hf_name(t.name) is not None)


def first_divergences(model, prompts: list[list[int]], theirs: list[list[int]]) -> tuple[list[int], list[float]]:
    """Teacher-forced along llama.cpp's greedy path, all prompts in one ragged batched
    forward: our greedy tokens equal theirs for n tokens iff our argmax at each of
    those n positions is their token, so one forward replaces n decode steps (on the
    2-core build machine, 32 steps of 20 rows cost ~1 minute of CPU per file).
    Returns per prompt the first differing index (n: none) and the near-tie gap
    there (our logit of our pick minus our logit of theirs; 0.0 where none)."""
    cfg = model.cfg
    paths = [p + t for p, t in zip(prompts, theirs)]
    width = max(map(len, paths))
    ids = torch.zeros(len(paths), width, dtype=torch.long)
    for b, path in enumerate(paths):
        ids[b, :len(path)] = torch.tensor(path)
    positions = torch.stack([torch.arange(width).clamp(max=len(p)) for p in paths])
    kv = ContiguousKV(cfg.num_layers, len(paths), cfg.num_kv_heads, width + 1, cfg.head_dim, model.dtype)
    with torch.inference_mode():
        logits = model(ids, positions, kv)                                      # [B, W, V]
    first, gaps = [], []
    for b, (prompt, tokens) in enumerate(zip(prompts, theirs)):
        rows = logits[b, len(prompt) - 1:len(prompt) - 1 + len(tokens)]         # predicts tokens[i]
        ours = rows.argmax(-1)
        differ = (ours != torch.tensor(tokens)).nonzero()
        i = int(differ[0]) if len(differ) else len(tokens)
        first.append(i)
        gaps.append(float(rows[i, ours[i]] - rows[i, tokens[i]]) if i < len(tokens) else 0.0)
    return first, gaps


# The first test also quantizes the three files (session fixture). Alone on the 2-core build
# machine the three take ~2-3 minutes of CPU; shared by other jobs, wall time stretches far beyond.
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("ftype", list(FILES), ids=[label for label, _ in FILES.values()])
def test_requantized_smollm2_matches_llamacpp(requantized, ftype, tokenizer, gguf_meta):
    pytest.importorskip("llama_cpp")
    from engines.llamacpp.native import plain_llama   # use_extra_bufts really off (AMX)

    label, must_match = FILES[ftype]
    path = requantized[ftype]
    prompts = [p for raw, chat in ((PROMPTS[0], PROMPTS[1]), (PROMPTS[2], [])) for p in
               prompt_ids(tokenizer, gguf_meta, raw, chat)]
    assert len(prompts) == 20
    # One thread: on a shared small CPU, llama.cpp's spinning thread barrier costs more than it gains.
    llm = plain_llama(str(path), n_ctx=512, n_batch=512, n_threads=1, verbose=False)
    theirs = [llamacpp_greedy(llm, p, NUM_TOKENS) for p in prompts]
    del llm                       # its thread pool must not spin beside ours
    model, _ = load_gguf(path, "cpu", torch.float32, llamacpp_numerics=False)
    loaded_bytes, file_bytes = model.weight_bytes(), file_weight_bytes(path)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight       # tied: one copy of the blocks
    # VRAM-equivalent (before the CPU's dequantized copies): within 3% of the file's tensor bytes.
    assert abs(loaded_bytes - file_bytes) <= 0.03 * file_bytes, (loaded_bytes, file_bytes)
    assert all(len(t) == NUM_TOKENS for t in theirs)     # max_tokens, not an end token, stopped them
    first, gaps = first_divergences(model, prompts, theirs)
    matched = sum(i == NUM_TOKENS for i in first)
    print(f"\n{label}: {matched}/20 prompts identical for {NUM_TOKENS} tokens; first divergence per prompt "
          f"{first}; gaps there {[round(g, 3) for i, g in zip(first, gaps) if i < NUM_TOKENS]}; "
          f"weights {loaded_bytes} B, file tensors {file_bytes} B")
    assert matched >= must_match, (label, matched, first, gaps)
    assert max(gaps) < NEAR_TIE, (label, first, gaps)
