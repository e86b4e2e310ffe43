"""The GGUF loader: names, the Q/K un-permutation, every quantization type, and
logits against llama.cpp on the very same file.

Tiny models (tiny_gguf.py) are written to real GGUF files; llama.cpp
(llama-cpp-python) runs them as the independent reference, and quantizes them
to K-quants, which the gguf package can read but not write.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from tiny_gguf import TINY, permute, random_state, write_tiny_gguf  # noqa: E402

from engines.errors import ModelLoadError  # noqa: E402
from engines.torch.model.attention import ContiguousKV  # noqa: E402
from engines.torch.load.gguf_loader import (  # noqa: E402
    bundled_model_path,
    hf_name,
    load_gguf,
    open_reader,
    read_metadata,
    unpermute_qk,
)

Q = gguf.GGMLQuantizationType
IDS = [int(i) for i in np.random.RandomState(0).randint(0, 256, 24)]


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return random_state(TINY)


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory, tiny_state) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", TINY, tiny_state)


def our_logits(path: Path, ids: list[int] = IDS) -> np.ndarray:
    model, _ = load_gguf(path, dtype=torch.float32)
    cfg = model.cfg
    kv = ContiguousKV(cfg.num_layers, 1, cfg.num_kv_heads, len(ids), cfg.head_dim, torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], kv)[0].numpy()


def llamacpp_logits(path: Path, ids: list[int] = IDS) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    from engines.llamacpp.native import plain_llama  # use_extra_bufts really off (AMX)
    # f32 KV (type_k/type_v 0 = GGML_TYPE_F32): the reference keeps full precision
    # where our model does.
    llm = plain_llama(str(path), n_ctx=256, n_threads=1, logits_all=True,
                          verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 4), half=st.integers(1, 4), cols=st.integers(1, 3))
def test_unpermute_inverts_convert_permute(heads, half, cols):
    w = np.arange(heads * half * 2 * cols, dtype=np.float32).reshape(heads * half * 2, cols)
    assert np.array_equal(unpermute_qk(permute(w, heads), heads), w)
    bias = w[:, 0].copy()
    assert np.array_equal(unpermute_qk(permute(bias, heads), heads), bias)


@pytest.mark.parametrize("gguf_name,expected", [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output.weight", "lm_head.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("blk.7.attn_q.weight", "model.layers.7.self_attn.q_proj.weight"),
    ("blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"),
    ("blk.12.ffn_down.weight", "model.layers.12.mlp.down_proj.weight"),
    ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
    ("rope_freqs.weight", None),
    ("blk.0.attn_q_norm.weight", "model.layers.0.self_attn.q_norm.weight"),
    ("blk.0.ffn_gate_exps.weight", "model.layers.0.mlp.experts.gate_proj.weight"),
    ("blk.0.ffn_gate.3.weight", None),          # old per-expert Mixtral layout
    ("blk.0.attn_post_norm.weight", None),
])
def test_tensor_names_map_to_hf(gguf_name, expected):
    assert hf_name(gguf_name) == expected


def test_f32_file_loads_exact_weights(tiny_f32, tiny_state):
    model, meta = load_gguf(tiny_f32, dtype=torch.float32)
    assert meta["general.architecture"] == "llama"
    # rms_eps travels as float32 in GGUF.
    assert model.cfg.rms_eps == pytest.approx(TINY.rms_eps)
    assert model.cfg.replace(rms_eps=TINY.rms_eps) == TINY
    loaded = model.state_dict()
    for name, tensor in tiny_state.items():
        assert torch.equal(loaded[name], tensor), name


def test_f32_logits_match_llamacpp(tiny_f32):
    ours, ref = our_logits(tiny_f32), llamacpp_logits(tiny_f32)
    # Same weights, same float32 math: only summation order differs.
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()
    assert (ours.argmax(1) == ref.argmax(1)).all()


def test_qwen2_arch_keeps_rows_loads_bias_and_matches_llamacpp(tmp_path):
    cfg = TINY.replace(qkv_bias=True, arch="qwen2", tie_embeddings=True)
    state = random_state(cfg, seed=1)
    path = write_tiny_gguf(tmp_path / "qwen.gguf", cfg, state, arch="qwen2")
    model, _ = load_gguf(path, dtype=torch.float32)
    assert model.cfg.qkv_bias and model.cfg.tie_embeddings and model.cfg.arch == "qwen2"
    loaded = model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ours, ref = our_logits(path), llamacpp_logits(path)
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


def test_llama3_rope_freqs_match_llamacpp_and_hf_scaling(tmp_path, tiny_state):
    """Llama 3.1+ GGUFs carry RoPE scaling as rope_freqs.weight divisors; the HF
    path computes the same from config.json's rope_scaling. Both must agree with
    llama.cpp at positions long enough for the low frequencies to matter."""
    from engines.torch.model.configs import rope_inv_freq
    from engines.torch.model.rope import RopeScaling
    from engines.torch.model.model import build_model

    scaled = TINY.replace(rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64), rope_theta=500000.0)
    factors = np.array(rope_inv_freq(scaled.replace(rope_scaling=RopeScaling()))) / \
        np.array(rope_inv_freq(scaled))
    assert factors.max() > 7.9 and factors.min() == 1.0
    path = write_tiny_gguf(tmp_path / "llama3.gguf", scaled.replace(rope_scaling=RopeScaling()),
                           tiny_state, rope_freqs=factors)
    ids = [int(i) for i in np.random.RandomState(1).randint(0, 256, 200)]
    ours, ref = our_logits(path, ids), llamacpp_logits(path, ids)
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()
    hf_path = build_model(scaled, dict(tiny_state), "cpu", torch.float32)
    kv = ContiguousKV(2, 1, 2, len(ids), 64, torch.float32)
    with torch.inference_mode():
        hf = hf_path(torch.tensor([ids]), torch.arange(len(ids))[None], kv)[0].numpy()
    assert np.abs(hf - ours).max() < 1e-4 * np.abs(ours).max()


# (type, relative RMS error bound of the weights after the round trip)
GGUF_PY_TYPES = [(Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 1e-2), (Q.Q4_0, 0.15), (Q.Q4_1, 0.12)]


def _weight_error(model, state) -> float:
    loaded = model.state_dict()
    errs = [((loaded[n].float() - t).norm() / t.norm()).item() for n, t in state.items() if t.ndim == 2]
    return max(errs)


@pytest.mark.parametrize("qtype,bound", GGUF_PY_TYPES, ids=lambda v: getattr(v, "name", str(v)))
def test_quantized_types_dequantize(tmp_path, tiny_state, qtype, bound):
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype.name}.gguf", TINY, tiny_state, qtype=qtype)
    model, _ = load_gguf(path, dtype=torch.float32)
    assert _weight_error(model, tiny_state) < bound


# llama.cpp ftypes: 15 Q4_K_M (Q4_K + Q6_K), 17 Q5_K_M (Q5_K + Q6_K), 18 Q6_K.
@pytest.mark.parametrize("ftype,types,bound", [(15, {"Q4_K", "Q6_K"}, 0.12),
                                               (17, {"Q5_K", "Q6_K"}, 0.06),
                                               (18, {"Q6_K"}, 0.03)])
def test_k_quants_dequantize_and_match_llamacpp(tmp_path, tiny_f32, tiny_state, ftype, types, bound):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / f"tiny-{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    assert llama_cpp.llama_model_quantize(str(tiny_f32).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    found = {t.tensor_type.name for t in open_reader(out).tensors} - {"F32"}
    assert found == types
    model, _ = load_gguf(out, dtype=torch.float32)
    assert _weight_error(model, tiny_state) < bound
    ours, ref = our_logits(out), llamacpp_logits(out)
    # llama.cpp rounds activations to 8 bits for quantized matmuls; we do not.
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.995


def test_bundled_model_metadata_gives_smollm2_config():
    from engines.torch.model.families import from_gguf_fields

    reader = open_reader(bundled_model_path())
    cfg = from_gguf_fields(read_metadata(reader), {t.name for t in reader.tensors})
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert (cfg.vocab_size, cfg.dim, cfg.ffn_dim, cfg.tie_embeddings) == (49152, 576, 1536, True)
    assert cfg.rope_theta == 100000.0 and cfg.eos_ids == (2,) and cfg.max_context == 8192


def test_missing_file_is_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")


def test_non_gguf_file_is_load_error(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_gguf(junk)


def test_unsupported_architecture_is_load_error(tmp_path, tiny_state):
    path = write_tiny_gguf(tmp_path / "bert.gguf", TINY, tiny_state, arch="bert")
    with pytest.raises(ModelLoadError, match="architecture 'bert'"):
        load_gguf(path, dtype=torch.float32)


def test_truncated_tensor_set_is_load_error(tmp_path, tiny_state):
    partial = {k: v for k, v in tiny_state.items() if "layers.1." not in k}
    path = write_tiny_gguf(tmp_path / "partial.gguf", TINY, partial)
    with pytest.raises(ModelLoadError, match="weights lack"):
        load_gguf(path, dtype=torch.float32)


def test_cpu_dtype_float32_by_default_bf16_for_speed_where_native():
    from engines.torch.load.gguf_loader import cpu_float_dtype, default_dtype

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_float_dtype() == default_dtype("cpu") == torch.float32
    assert cpu_float_dtype(prefer_speed=True) == (torch.bfloat16 if native else torch.float32)
    assert default_dtype("cuda") == torch.bfloat16


def test_bf16_load_is_close_to_float32(tiny_f32):
    model, _ = load_gguf(tiny_f32, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    reference, _ = load_gguf(tiny_f32)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a.float(), b, rtol=1e-2, atol=1e-3), name



@pytest.mark.parametrize("ftype", [15, 17])
def test_torch_dequant_equals_gguf_quants(tmp_path, tiny_f32, tiny_state, ftype):
    """engines.torch.load.dequant (the GPU path) gives the same floats as gguf.quants for
    every type it handles, here run on the CPU: Q8_0, Q4_0, Q4_1 written by gguf-py,
    Q4_K, Q5_K, Q6_K written by llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from engines.torch.load.dequant import TORCH_DEQUANT, dequantize_raw
    from engines.torch.load.gguf_loader import dequantize_tensor

    out = tmp_path / f"k{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    assert llama_cpp.llama_model_quantize(str(tiny_f32).encode(), str(out).encode(),
                                          ctypes.byref(params)) == 0
    files = [out] + [write_tiny_gguf(tmp_path / f"{q.name}.gguf", TINY, tiny_state, qtype=q)
                     for q in (Q.Q8_0, Q.Q4_0, Q.Q4_1)]
    seen = set()
    for path in files:
        for tensor in open_reader(path).tensors:
            name = tensor.tensor_type.name
            if name in TORCH_DEQUANT:
                want = dequantize_tensor(tensor)
                got = dequantize_raw(torch.from_numpy(np.array(tensor.data)), name, want.shape)
                assert np.array_equal(got.numpy(), want), (path.name, tensor.name)
                seen.add(name)
    assert seen >= {"Q8_0", "Q4_0", "Q4_1", "Q6_K", "Q4_K" if ftype == 15 else "Q5_K"}


def test_metadata_is_handed_over_before_any_weight_is_read(tiny_f32, monkeypatch):
    """source.read_model builds the tokenizer from it while the weights load."""
    from engines.torch.load import gguf_loader

    order: list[str] = []
    reading = gguf_loader.load_gguf_state
    monkeypatch.setattr(gguf_loader, "load_gguf_state",
                        lambda *a, **k: (order.append("weights"), reading(*a, **k))[1])
    seen = {}
    gguf_loader.load_gguf(tiny_f32, on_metadata=lambda meta, cfg: (order.append("metadata"),
                                                                   seen.update(meta=meta, cfg=cfg)))
    assert order == ["metadata", "weights"]
    assert seen["cfg"].num_layers == TINY.num_layers and "general.architecture" in seen["meta"]


def test_read_model_builds_the_tokenizer_beside_the_weights(tiny_f32):
    from engines.base import ModelInfo
    from engines.torch.source import read_model

    model, text = read_model(ModelInfo(name="tiny", path=str(tiny_f32), source="gguf"), torch.device("cpu"),
                             torch.float32, lambda f: None, False)
    assert text is not None and text.tokenizer.vocab and model.cfg.num_layers == TINY.num_layers
