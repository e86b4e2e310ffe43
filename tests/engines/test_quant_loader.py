"""The quantized GGUF loader (issue 16) on tiny files: every 2-D block weight stays
a QuantWeight whose rows are the file's own, in the model's order (Q/K
un-permuted on block rows), q/k/v and gate/up fused on raw rows where one type
holds them all (biases concatenated), apart where types differ; weight bytes
are the file's tensor bytes; logits follow llama.cpp's on the same file."""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).parent))
from tiny_families import FAMILY_CASES, write_family_gguf  # noqa: E402
from tiny_families import random_state as family_state  # noqa: E402
from tiny_gguf import TINY, random_state, write_tiny_gguf  # noqa: E402

from engines.torch.load.gguf_loader import load_gguf, open_reader, unpermute_qk  # noqa: E402
from engines.torch.load.gguf_names import hf_name  # noqa: E402
from engines.torch.model.attention import ContiguousKV  # noqa: E402
from engines.torch.quant.modules import QuantEmbedding, QuantLinear  # noqa: E402

IDS = [int(i) for i in np.random.RandomState(1).randint(0, 256, 16)]


def requantize(source: Path, out: Path, ftype: int) -> Path:
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def expected_rows(path: Path, cfg) -> dict[str, tuple[str, torch.Tensor]]:
    """HF name -> (type, float32 weight in the model's row order), straight from gguf-py."""
    out = {}
    permuted = cfg.arch == "llama"
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    for t in open_reader(path).tensors:
        name = hf_name(t.name, cfg.arch)
        if name is None or len(t.shape) != 2:
            continue
        w = dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
        proj = name.split(".")[-2]
        if permuted and proj in heads:
            w = unpermute_qk(w, heads[proj])
        out[name] = (t.tensor_type.name, torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
    return out


def model_weight(model, name: str) -> torch.Tensor:
    """A weight of the model by its unfused HF name, dequantized (slicing fused rows)."""
    module_name = name.removesuffix(".weight")
    parent, _, leaf = module_name.rpartition(".")
    owner = model.get_submodule(parent)
    if hasattr(owner, leaf) and getattr(owner, leaf) is not None:
        module = getattr(owner, leaf)
        return module.qweight.dequantize() if isinstance(module, (QuantLinear, QuantEmbedding)) else module.weight
    fused, parts = (("qkv_proj", ("q_proj", "k_proj", "v_proj")) if leaf in ("q_proj", "k_proj", "v_proj")
                    else ("gate_up_proj", ("gate_proj", "up_proj")))
    module = getattr(owner, fused)
    sizes = [getattr(model.cfg, "num_heads") * model.cfg.head_dim if p == "q_proj" else
             model.cfg.num_kv_heads * model.cfg.head_dim if p in ("k_proj", "v_proj") else model.cfg.ffn_dim
             for p in parts]
    return module.qweight.dequantize().split(sizes)[parts.index(leaf)]


def file_bytes(path: Path, arch: str) -> int:
    return sum(int(t.n_bytes) for t in open_reader(path).tensors if hf_name(t.name, arch) is not None)


def logits(model, ids=IDS) -> np.ndarray:
    cfg = model.cfg
    kv = ContiguousKV(cfg.num_layers, 1, cfg.num_kv_heads, len(ids), cfg.head_dim, torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], kv)[0].numpy()


def llamacpp_logits(path: Path, ids=IDS) -> np.ndarray:
    pytest.importorskip("llama_cpp")
    from engines.llamacpp.native import plain_llama  # use_extra_bufts really off (AMX)

    llm = plain_llama(str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


@pytest.mark.parametrize("ftype", [7, 15], ids=["Q8_0", "Q4_K_M"])
def test_llama_blocks_stay_blocks_in_the_models_row_order(tmp_path, ftype):
    cfg = TINY.replace(num_layers=4)      # Q4_K_M keeps layer 2's attn_v in Q6_K (llama.cpp's use_more_bits)
    source = write_tiny_gguf(tmp_path / "f32.gguf", cfg, random_state(cfg))
    path = requantize(source, tmp_path / f"q{ftype}.gguf", ftype)
    model, _ = load_gguf(path, "cpu", torch.float32, llamacpp_numerics=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    expected = expected_rows(path, model.cfg)
    fused = []
    for i, layer in enumerate(model.model.layers):
        types = {expected[f"model.layers.{i}.self_attn.{p}_proj.weight"][0] for p in "qkv"}
        fused.append(layer.self_attn.qkv_proj is not None)
        assert fused[-1] == (len(types) == 1), (i, types)
        assert isinstance(layer.mlp.gate_up_proj, QuantLinear)
    assert all(fused) if ftype == 7 else (any(fused) and not all(fused)), fused
    for name, (type_name, ref) in expected.items():
        if type_name in ("F32", "F16"):
            continue
        assert torch.equal(model_weight(model, name), ref), name
    assert abs(model.weight_bytes() - file_bytes(path, "llama")) <= 0.03 * file_bytes(path, "llama")
    model.fuse_projections()            # the runner's call: a no-op on quantized parts, never an error
    ours, ref = logits(model), llamacpp_logits(path)
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.995


def test_qwen2_fused_rows_carry_their_biases(tmp_path):
    cfg, extra = FAMILY_CASES["qwen2"]
    state = family_state(cfg)
    path = requantize(write_family_gguf(tmp_path / "qwen2.gguf", cfg, extra, state), tmp_path / "q8.gguf", 7)
    model, _ = load_gguf(path, "cpu", torch.float32, llamacpp_numerics=False)
    attn = model.model.layers[1].self_attn
    assert isinstance(attn.qkv_proj, QuantLinear) and attn.qkv_proj.qweight.type_name == "Q8_0"
    biases = [state[f"model.layers.1.self_attn.{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(attn.qkv_proj.bias, torch.cat(biases))
    ours, ref = logits(model), llamacpp_logits(path)
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.995
