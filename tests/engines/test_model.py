"""The torch Llama model on tiny random weights: batching, chunked prefill, GQA
attention, RoPE scaling, and the safetensors and synthetic paths."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_gguf import TINY, random_state  # noqa: E402

from engines.errors import ModelLoadError  # noqa: E402
from engines.torch.model.attention import ContiguousKV, cache_attention, causal_mask  # noqa: E402
from engines.torch.model.configs import NAMED_CONFIGS, named_config, rope_inv_freq  # noqa: E402
from engines.torch.model.hf_config import from_hf_config  # noqa: E402
from engines.torch.model.rope import RopeScaling  # noqa: E402
from engines.torch.model.model import LlamaModel, build_model  # noqa: E402
from engines.torch.model.synthetic import synthetic_model  # noqa: E402

CFG = TINY.replace(vocab_size=300, dim=128, num_heads=4, num_kv_heads=2, head_dim=32, ffn_dim=256)


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    torch.manual_seed(0)
    return build_model(CFG, random_state(CFG), "cpu", torch.float32)


def run(model: LlamaModel, ids: list[int], chunks: int = 1) -> torch.Tensor:
    """Logits [T, V] for one sequence, prefilled in `chunks` pieces."""
    kv = ContiguousKV(CFG.num_layers, 1, CFG.num_kv_heads, len(ids), CFG.head_dim, torch.float32)
    bounds = [round(i * len(ids) / chunks) for i in range(chunks + 1)]
    out = []
    with torch.inference_mode():
        for a, b in zip(bounds, bounds[1:]):
            out.append(model(torch.tensor([ids[a:b]]), torch.arange(a, b)[None], kv)[0])
    return torch.cat(out)


def test_chunked_prefill_and_decode_equal_one_shot(model):
    ids = list(range(3, 40))
    whole = run(model, ids)
    assert torch.allclose(run(model, ids, chunks=3), whole, atol=1e-4)
    assert torch.allclose(run(model, ids, chunks=len(ids)), whole, atol=1e-4)   # token by token


def test_ragged_batch_equals_single_sequences(model):
    seqs = [list(range(5, 25)), list(range(50, 57)), [7]]
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    # Padding rule (attention.py): pad tokens sit after the row's end.
    positions = torch.stack([torch.arange(width).clamp(max=n) for n in lengths.tolist()])
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
    kv = ContiguousKV(CFG.num_layers, len(seqs), CFG.num_kv_heads, width + 4, CFG.head_dim, torch.float32)
    with torch.inference_mode():
        last = model(ids, positions, kv, logit_index=lengths - 1)[:, 0]        # [B, V]
        step = model(torch.tensor([[11], [12], [13]]), lengths[:, None], kv)[:, 0]
    for b, s in enumerate(seqs):
        alone = run(model, s + [11 + b])
        assert torch.allclose(last[b], alone[len(s) - 1], atol=1e-4)
        assert torch.allclose(step[b], alone[len(s)], atol=1e-4)


def naive_attention(q, k, v, positions):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~causal_mask(positions, k.shape[2]), float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("heads,kv_heads,t", [(4, 2, 5), (9, 3, 1), (8, 8, 3), (6, 1, 4)])
def test_gqa_attention_matches_naive(heads, kv_heads, t):
    gen = torch.Generator().manual_seed(heads * 10 + t)
    q = torch.randn(2, heads, t, 16, generator=gen)
    k = torch.randn(2, kv_heads, 12, 16, generator=gen)
    v = torch.randn(2, kv_heads, 12, 16, generator=gen)
    positions = torch.tensor([[7 + i for i in range(t)], [11 - t + 1 + i for i in range(t)]])
    mask = causal_mask(positions, 12)
    got = cache_attention(q, k, v, mask, 12)
    assert torch.allclose(got, naive_attention(q, k, v, positions), atol=1e-5)


def test_unmasked_single_decode_reads_whole_range():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, n, 8, generator=gen) for h, n in ((4, 1), (2, 6), (2, 6)))
    positions = torch.tensor([[5]])
    assert torch.allclose(cache_attention(q, k, v, None, 6), naive_attention(q, k, v, positions), atol=1e-5)


def test_llama3_rope_scaling_follows_reference():
    cfg = named_config("llama-3.1-8b")
    inv = rope_inv_freq(cfg)
    base = rope_inv_freq(cfg.replace(rope_scaling=RopeScaling()))
    # High frequencies (wavelength < 8192/4) unchanged, low (> 8192) divided by 8.
    assert inv[0] == base[0]
    assert inv[-1] == pytest.approx(base[-1] / 8)
    middle = [i for i, f in enumerate(base) if 2048 <= 2 * math.pi / f <= 8192]
    assert middle and all(base[i] / 8 < inv[i] < base[i] for i in middle)


def test_hf_config_parses_llama3_and_rejects_unknown():
    cfg = from_hf_config({
        "model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 16, "intermediate_size": 8192,
        "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "eos_token_id": [128001, 128008, 128009], "max_position_embeddings": 131072})
    assert cfg == named_config("llama-3.2-1b").replace(bos_id=None)
    with pytest.raises(ModelLoadError, match="model_type 'gpt2'"):
        from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ModelLoadError, match="dynamic"):
        from_hf_config({**{"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
                           "intermediate_size": 8, "vocab_size": 8},
                        "rope_scaling": {"type": "dynamic", "factor": 2}})


def test_named_configs_have_published_sizes():
    expected = {"smollm2-135m": 134.5e6, "llama-3.2-1b": 1.236e9, "llama-3.1-8b": 8.03e9,
                "qwen3-8b": 8.19e9, "qwen3-30b-a3b": 30.5e9, "gemma-3-12b": 11.77e9, "phi-4-mini": 3.84e9}
    for name, count in expected.items():
        assert NAMED_CONFIGS[name].num_params == pytest.approx(count, rel=0.01)
    with pytest.raises(ModelLoadError, match="no named model config"):
        named_config("llama-99b")


def test_invalid_config_is_load_error():
    with pytest.raises(ModelLoadError, match="num_kv_heads"):
        CFG.replace(num_kv_heads=3)


def test_safetensors_folder_gives_same_logits(tmp_path, model):
    from safetensors.torch import save_file

    from engines.torch.load.safetensors_loader import load_safetensors

    state = {k: v.contiguous() for k, v in random_state(CFG).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": CFG.dim, "num_attention_heads": CFG.num_heads,
        "num_key_value_heads": CFG.num_kv_heads, "num_hidden_layers": CFG.num_layers,
        "intermediate_size": CFG.ffn_dim, "vocab_size": CFG.vocab_size, "rms_norm_eps": CFG.rms_eps,
        "rope_theta": CFG.rope_theta, "tie_word_embeddings": False}))
    loaded = load_safetensors(tmp_path, dtype=torch.float32)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    assert torch.equal(run(loaded, ids), run(model, ids))


def test_safetensors_errors_are_typed(tmp_path):
    from engines.torch.load.safetensors_loader import load_safetensors

    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_safetensors(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_safetensors(tmp_path)


def test_synthetic_model_is_seeded_and_finite():
    a = synthetic_model(CFG, "cpu", torch.bfloat16, seed=1)
    b = synthetic_model(CFG, "cpu", torch.bfloat16, seed=1)
    assert a.dtype == torch.bfloat16
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    kv = ContiguousKV(CFG.num_layers, 1, CFG.num_kv_heads, 8, CFG.head_dim, torch.bfloat16)
    with torch.inference_mode():
        logits = a(torch.tensor([[1, 2, 3]]), torch.arange(3)[None], kv)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert a.weight_bytes() == CFG.num_params * 2


def test_fused_projections_give_same_logits():
    fused = build_model(CFG.replace(qkv_bias=True), random_state(CFG.replace(qkv_bias=True)), "cpu",
                        torch.float32)
    ids = list(range(3, 20))
    before = run(fused, ids)
    bytes_before = fused.weight_bytes()
    fused.fuse_projections()
    assert fused.model.layers[0].self_attn.qkv_proj is not None
    assert fused.weight_bytes() == bytes_before
    assert torch.allclose(run(fused, ids), before, atol=1e-5)
