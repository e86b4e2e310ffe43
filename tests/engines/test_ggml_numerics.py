"""The torch engine's llama.cpp-numerics CPU path (engines/torch/ggml_*.py)
against llama.cpp itself: its activation quantizer called through ctypes, and
the whole default model's logits, which must agree to the last bit."""
from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch

from engines.torch.model.attention import ContiguousKV
from engines.torch.ggml.linear import GgmlLinear
from engines.torch.ggml.math import reduce_add16, v_expf
from engines.torch.ggml.numerics import HEAD_EXACT_WITHIN, is_applicable, kv_cache_dtype, uses_llamacpp_numerics
from engines.torch.ggml.quant import q8_blocks
from engines.torch.load.gguf_loader import bundled_model_path, load_gguf

IDS = [1, 504, 3287, 9145, 30, 2113, 28, 2014, 4451, 314, 253, 1400]


def ggml_cpu():
    llama_cpp = pytest.importorskip("llama_cpp")
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so")
    if not os.path.exists(path):
        pytest.skip("llama-cpp-python without libggml-cpu.so")
    lib = ctypes.CDLL(path)
    for fn in (lib.quantize_row_q8_1, lib.quantize_row_q8_0):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def activation_rows() -> np.ndarray:
    """Random rows plus the cases that broke earlier emulations: exact .5 ties at
    127-multiples of amax, values an ulp either side, zero blocks, huge outliers."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((64, 576)).astype(np.float32) * rng.uniform(0.01, 50, (64, 1)).astype(np.float32)
    rows[0, :32] = 0.0
    rows[1, :32] = np.float32(127.0)
    rows[1, 1:9] = [2.5, -2.5, 3.5, -3.5, 0.5, 1.5, 25.5, -25.5]
    rows[2, 5] = 3e4
    ulp = np.nextafter(rows[3:8], np.float32(np.inf)) - rows[3:8]
    rows[8:13] = rows[3:8] + ulp
    return rows


@pytest.mark.parametrize("kind", ["q8_1", "q8_0"])
def test_activation_quantizer_equals_llamacpp(kind):
    lib = ggml_cpu()
    rows = activation_rows()
    size = 36 if kind == "q8_1" else 34
    ref = np.zeros((rows.shape[0], rows.shape[1] // 32 * size), dtype=np.uint8)
    fn = lib.quantize_row_q8_1 if kind == "q8_1" else lib.quantize_row_q8_0
    for row, out in zip(rows, ref):
        fn(np.ascontiguousarray(row).ctypes.data, out.ctypes.data, row.size)
    blocks = ref.reshape(rows.shape[0], -1, size)
    head = 4 if kind == "q8_1" else 2
    q, d, s = q8_blocks(torch.from_numpy(rows))
    assert np.array_equal(q.numpy().astype(np.int8), blocks[..., head:].view(np.int8))
    assert np.array_equal(d.numpy(), blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == "q8_1":
        assert np.array_equal(s.numpy(), blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))


def test_bad_activation_width_is_value_error():
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        q8_blocks(torch.ones(2, 33))


def test_v_expf_is_exp_within_two_ulp_and_maps_minus_inf_to_zero():
    x = torch.linspace(-80, 0, 4001)
    got = v_expf(x)
    assert torch.allclose(got, torch.exp(x.double()).float(), rtol=3e-7, atol=0)
    assert v_expf(torch.tensor([float("-inf")])).item() == 0.0
    assert reduce_add16(torch.arange(16.0)).item() == 120.0


@pytest.fixture(scope="module")
def ggml_model():
    model, _ = load_gguf(bundled_model_path(), "cpu", torch.float32)
    return model


def test_default_model_on_cpu_takes_llamacpp_numerics(ggml_model):
    assert uses_llamacpp_numerics(ggml_model)
    assert kv_cache_dtype(ggml_model) == torch.float16
    exact = [m for m in ggml_model.modules() if isinstance(m, GgmlLinear)]
    assert len(exact) == 30 * 7 + 1 and all(m.is_exact for m in exact)   # + the tied lm_head
    assert not is_applicable({"Q4_1"}, "cpu", torch.bfloat16)
    assert not is_applicable({"F32"}, "cpu", torch.float32)
    assert not is_applicable({"Q4_1"}, "meta", torch.float32)


def test_switch_off_gives_the_plain_model():
    model, _ = load_gguf(bundled_model_path(), "cpu", torch.float32, llamacpp_numerics=False)
    assert not uses_llamacpp_numerics(model) and kv_cache_dtype(model) == torch.float32


def test_prefill_logits_equal_llamacpp_to_the_last_bit(ggml_model):
    from engines.llamacpp.native import plain_llama  # use_extra_bufts really off (AMX)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = plain_llama(str(bundled_model_path()), n_ctx=64, n_threads=2, logits_all=True,
                          verbose=False)
    llm.eval(IDS)
    ref = np.array(llm.scores[:len(IDS)])
    cfg = ggml_model.cfg
    kv = ContiguousKV(cfg.num_layers, 1, cfg.num_kv_heads, 64, cfg.head_dim, kv_cache_dtype(ggml_model))
    with torch.inference_mode():
        ours = ggml_model(torch.tensor([IDS]), torch.arange(len(IDS))[None], kv)[0].numpy()
    top = ref >= ref.max(1, keepdims=True) - HEAD_EXACT_WITHIN / 2   # exact there (lm_head's shortcut)
    assert np.array_equal(ours[top], ref[top]), f"max |diff| {np.abs(ours - ref)[top].max()}"
    assert np.abs(ours - ref).max() < 1e-3
    assert (ours.argmax(1) == ref.argmax(1)).all()
