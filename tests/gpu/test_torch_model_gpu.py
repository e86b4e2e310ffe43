"""The torch Llama model on a CUDA device: GPU output matches CPU output, attention
works on strided KV views laid out as kvcached lays them out, and logits agree
with Hugging Face transformers (present on the GPU machine) on the same weights.

Runs with `PYTHONPATH=. python3 -m pytest tests/gpu` (no gguf package needed:
weights are synthetic and seeded; the default GGUF is used only where `gguf`
imports).
"""
from __future__ import annotations

import pytest
import torch

from engines.torch.model.attention import (PLAIN, ContiguousKV, KVAccess, cache_attention, causal_mask,
                                          write_kv)
from engines.torch.model.configs import named_config
from engines.torch.model.model import LlamaModel, build_model
from engines.torch.model.synthetic import synthetic_state

pytestmark = pytest.mark.gpu
CFG = named_config("smollm2-135m").replace(num_layers=6)   # real shapes, fewer layers: fast
PROMPTS = [[1, 504, 3575, 282, 4649, 314], [1604, 275, 24, 104, 727], [88, 2756, 31394, 15107, 114]]


@pytest.fixture(scope="module")
def cpu_state() -> dict[str, torch.Tensor]:
    return synthetic_state(CFG, "cpu", torch.float32, seed=7)


def model_on(state, device: str, dtype: torch.dtype) -> LlamaModel:
    return build_model(CFG, {k: v.to(device) for k, v in state.items()}, device, dtype)


def prefill_logits(model: LlamaModel, ids: list[int], kv: KVAccess | None = None) -> torch.Tensor:
    dev = model.device
    kv = kv or ContiguousKV(CFG.num_layers, 1, CFG.num_kv_heads, 64, CFG.head_dim, model.dtype, dev)
    with torch.inference_mode():
        return model(torch.tensor([ids], device=dev), torch.arange(len(ids), device=dev)[None], kv)[0]


def greedy(model: LlamaModel, ids: list[int], n: int) -> list[int]:
    dev = model.device
    kv = ContiguousKV(CFG.num_layers, 1, CFG.num_kv_heads, len(ids) + n, CFG.head_dim, model.dtype, dev)
    out: list[int] = []
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=dev), torch.arange(len(ids), device=dev)[None], kv)
        for i in range(n):
            out.append(int(logits[0, -1].argmax()))
            pos = torch.tensor([[len(ids) + i]], device=dev)
            logits = model(torch.tensor([[out[-1]]], device=dev), pos, kv)
    return out


def test_gpu_float32_matches_cpu(cpu_state):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, gpu = model_on(cpu_state, "cpu", torch.float32), model_on(cpu_state, "cuda", torch.float32)
    for ids in PROMPTS:
        a, b = prefill_logits(cpu, ids), prefill_logits(gpu, ids).cpu()
        assert torch.allclose(a, b, atol=2e-3, rtol=1e-3), (a - b).abs().max()
        assert greedy(cpu, ids, 12) == greedy(gpu, ids, 12)


def test_gpu_bfloat16_tracks_cpu_float32(cpu_state):
    cpu, gpu = model_on(cpu_state, "cpu", torch.float32), model_on(cpu_state, "cuda", torch.bfloat16)
    for ids in PROMPTS:
        a, b = prefill_logits(cpu, ids), prefill_logits(gpu, ids).cpu()
        corr = torch.corrcoef(torch.stack([a.ravel(), b.ravel()]))[0, 1]
        assert corr > 0.99, corr


class StridedKV(KVAccess):
    """KV in kvcached's per-slot layout [max_ctx, L, 2, H_kv, D]: per-layer views
    are strided (token-major), only the last dim is contiguous."""

    def __init__(self, max_ctx: int, dtype: torch.dtype) -> None:
        self.region = torch.zeros(max_ctx, CFG.num_layers, 2, CFG.num_kv_heads, CFG.head_dim,
                                  dtype=dtype, device="cuda")
        self._mask: torch.Tensor | None = None
        self._read_len = 0

    def view(self, layer: int, which: int) -> torch.Tensor:
        return self.region[:, layer, which].permute(1, 0, 2).unsqueeze(0)   # [1, H, T, D]

    def begin(self, positions: torch.Tensor) -> None:
        self._read_len = int(positions.max()) + 1
        self._mask = None if positions.shape == (1, 1) else causal_mask(positions, self._read_len)

    def attend(self, layer, q, k, v, positions, spec=PLAIN):
        kc, vc = self.view(layer, 0), self.view(layer, 1)
        write_kv(kc, vc, k, v, positions)
        return cache_attention(q, kc, vc, self._mask, self._read_len, spec, positions)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_strided_kvcached_layout_gives_same_logits(cpu_state, dtype):
    gpu = model_on(cpu_state, "cuda", dtype)
    ids = PROMPTS[0] + PROMPTS[1]
    strided = StridedKV(64, dtype)
    ref = prefill_logits(gpu, ids)
    got = prefill_logits(gpu, ids, strided)
    assert torch.allclose(got, ref, atol=5e-2), (got - ref).abs().max()
    assert strided.region.abs().sum() > 0     # the writes landed in the region


def test_matches_hugging_face_transformers(cpu_state):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.dim, intermediate_size=CFG.ffn_dim,
        num_hidden_layers=CFG.num_layers, num_attention_heads=CFG.num_heads,
        num_key_value_heads=CFG.num_kv_heads, head_dim=CFG.head_dim, rms_norm_eps=CFG.rms_eps,
        rope_theta=CFG.rope_theta, tie_word_embeddings=True, max_position_embeddings=CFG.max_context)
    hf = transformers.LlamaForCausalLM(hf_cfg).to("cuda", torch.float32).eval()
    missing, unexpected = hf.load_state_dict({k: v.cuda() for k, v in cpu_state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ours = model_on(cpu_state, "cuda", torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    for ids in PROMPTS:
        with torch.inference_mode():
            ref = hf(torch.tensor([ids], device="cuda")).logits[0].float()
        got = prefill_logits(ours, ids)
        assert torch.allclose(got, ref, atol=2e-3, rtol=1e-3), (got - ref).abs().max()


def test_default_gguf_greedy_gpu_equals_cpu():
    pytest.importorskip("gguf")
    from engines.torch.load.gguf_loader import bundled_model_path, load_gguf

    try:
        path = bundled_model_path()
    except Exception as exc:
        pytest.skip(f"default model unavailable: {exc}")
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu, _ = load_gguf(path, "cpu", torch.float32)
    gpu, _ = load_gguf(path, "cuda", torch.float32)
    agree = sum(greedy(cpu, ids, 16) == greedy(gpu, ids, 16) for ids in PROMPTS)
    assert agree >= len(PROMPTS) - 1


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_dequant_on_gpu_equals_cpu(type_name):
    """The loader's GPU decode path (engines.torch.load.dequant) gives the CPU's floats;
    the CPU path is checked against gguf.quants in tests/engines/test_gguf_loader.py."""
    from engines.torch.load.dequant import TORCH_DEQUANT, dequantize_raw

    block, size, _ = TORCH_DEQUANT[type_name]
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (64 * size,), dtype=torch.uint8, generator=gen)
    cpu = dequantize_raw(raw, type_name, (64 * block,))
    gpu = dequantize_raw(raw.cuda(), type_name, (64 * block,)).cpu()
    assert torch.allclose(cpu, gpu, rtol=0, atol=0, equal_nan=True)
