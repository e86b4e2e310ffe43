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
from engines.torch.attention import ContiguousKV  # noqa: E402
from engines.torch.gguf_loader import (  # noqa: E402
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
    model, _ = load_gguf(path)
    cfg = model.cfg
    kv = ContiguousKV(cfg.num_layers, 1, cfg.num_kv_heads, len(ids), cfg.head_dim, torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], kv)[0].numpy()


def llamacpp_logits(path: Path, ids: list[int] = IDS) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    # f32 KV (type_k/type_v 0 = GGML_TYPE_F32): the reference keeps full precision
    # where our model does; use_extra_bufts=False avoids the AMX decode segfault.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True,
                          use_extra_bufts=False, verbose=False, type_k=0, type_v=0)
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
    ("blk.0.attn_q_norm.weight", None),
])
def test_tensor_names_map_to_hf(gguf_name, expected):
    assert hf_name(gguf_name) == expected


def test_f32_file_loads_exact_weights(tiny_f32, tiny_state):
    model, meta = load_gguf(tiny_f32)
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


def test_qwen2_arch_keeps_rows_and_loads_bias(tmp_path):
    cfg = TINY.replace(qkv_bias=True, arch="qwen2", tie_embeddings=True)
    state = random_state(cfg, seed=1)
    path = write_tiny_gguf(tmp_path / "qwen.gguf", cfg, state, arch="qwen2")
    model, _ = load_gguf(path)
    assert model.cfg.qkv_bias and model.cfg.tie_embeddings and model.cfg.arch == "qwen2"
    loaded = model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


# (type, relative RMS error bound of the weights after the round trip)
GGUF_PY_TYPES = [(Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 1e-2), (Q.Q4_0, 0.15), (Q.Q4_1, 0.12)]


def _weight_error(model, state) -> float:
    loaded = model.state_dict()
    errs = [((loaded[n].float() - t).norm() / t.norm()).item() for n, t in state.items() if t.ndim == 2]
    return max(errs)


@pytest.mark.parametrize("qtype,bound", GGUF_PY_TYPES, ids=lambda v: getattr(v, "name", str(v)))
def test_quantized_types_dequantize(tmp_path, tiny_state, qtype, bound):
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype.name}.gguf", TINY, tiny_state, qtype=qtype)
    model, _ = load_gguf(path)
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
    model, _ = load_gguf(out)
    assert _weight_error(model, tiny_state) < bound
    ours, ref = our_logits(out), llamacpp_logits(out)
    # llama.cpp rounds activations to 8 bits for quantized matmuls; we do not.
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.995


def test_bundled_model_metadata_gives_smollm2_config():
    from engines.torch.configs import from_gguf_fields

    reader = open_reader(bundled_model_path())
    names = {t.name for t in reader.tensors}
    cfg = from_gguf_fields(read_metadata(reader), "blk.0.attn_q.bias" in names, "output.weight" in names)
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
        load_gguf(path)


def test_truncated_tensor_set_is_load_error(tmp_path, tiny_state):
    partial = {k: v for k, v in tiny_state.items() if "layers.1." not in k}
    path = write_tiny_gguf(tmp_path / "partial.gguf", TINY, partial)
    with pytest.raises(ModelLoadError, match="weights lack"):
        load_gguf(path)
