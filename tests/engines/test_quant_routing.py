"""Routing of quantized GGUFs (issue 16): a weight type the torch engine has no
kernel for (IQ*, TQ*, MXFP4), stacked experts included, goes to llama.cpp with a
reason (a warning in the log, the note /api/ps shows), never to a silent
dequantization or a 500; every type with a kernel goes to torch on a GPU.
The routing reads only the header, so header-only files suffice there; the
last test quantizes a tiny model to IQ4_NL with llama.cpp and serves it.
"""
from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_gguf import TINY, random_state, write_tiny_gguf  # noqa: E402

from engines.base import ModelInfo  # noqa: E402
from engines.choice import choose_engine  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.errors import ModelLoadError  # noqa: E402
from engines.types import GenerateRequest, RequestKind, SamplingParams  # noqa: E402

Q = gguf.GGMLQuantizationType
NO_KERNEL = ["IQ2_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4"]
WITH_KERNEL = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]


def write_typed_header(path: Path, types: dict[str, str]) -> Path:
    """A llama GGUF whose tensors (name -> type name) hold one row of zero blocks each."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    for name, type_name in types.items():
        qtype = Q[type_name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        experts = (2,) if "_exps." in name else ()
        w.add_tensor(name, np.zeros((*experts, 1, size), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def choose(path: Path, has_cuda: bool = True):
    return choose_engine(ModelInfo(name=path.stem, path=str(path), family="llama"), EngineConfig(), has_cuda)


def _names(type_name: str) -> dict[str, str]:
    return {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": type_name, "blk.0.ffn_down.weight": "Q6_K"}


@pytest.mark.parametrize("type_name", NO_KERNEL)
def test_types_without_kernel_go_to_llamacpp_with_the_type_named(tmp_path, type_name):
    choice = choose(write_typed_header(tmp_path / f"{type_name}.gguf", _names(type_name)))
    assert (choice.engine, choice.is_detour) == ("llamacpp", True)
    assert f"no kernel for {type_name}" in choice.reason and "1 of 3 tensors" in choice.reason


@pytest.mark.parametrize("type_name", WITH_KERNEL)
def test_types_with_a_kernel_stay_on_torch(tmp_path, type_name):
    path = write_typed_header(tmp_path / f"{type_name}.gguf", _names(type_name))
    assert (choose(path).engine, choose(path).is_detour) == ("torch", False)
    assert choose(path, has_cuda=False).engine == "llamacpp" and not choose(path, has_cuda=False).is_detour


def test_stacked_experts_go_by_their_type(tmp_path):
    """Experts stacked in blocks of a type with a kernel stay on torch (quant_experts.py; they
    went to llama.cpp before it); in a type without one they go to llama.cpp like any weight."""
    base = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_gate_inp.weight": "F32"}
    dense = write_typed_header(tmp_path / "f16.gguf", {**base, "blk.0.ffn_gate_exps.weight": "F16"})
    assert choose(dense).engine == "torch"
    blocks = write_typed_header(tmp_path / "q4k.gguf", {**base, "blk.0.ffn_gate_exps.weight": "Q4_K"})
    assert (choose(blocks).engine, choose(blocks).is_detour) == ("torch", False)
    iq = write_typed_header(tmp_path / "iq.gguf", {**base, "blk.0.ffn_gate_exps.weight": "IQ4_XS"})
    assert choose(iq).engine == "llamacpp" and "no kernel for IQ4_XS" in choose(iq).reason


@pytest.fixture(scope="module")
def iq4_nl_file(tmp_path_factory) -> Path:
    """A tiny Llama quantized by llama.cpp itself to IQ4_NL (its legacy IQ type that needs no imatrix)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    folder = tmp_path_factory.mktemp("iq")
    source = write_tiny_gguf(folder / "tiny-f32.gguf", TINY, random_state(TINY))
    out = folder / "tiny-iq4_nl.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def test_iq_file_is_served_by_llamacpp_with_a_note(iq4_nl_file, caplog):
    """Routed as on a GPU machine, the factory makes the llama.cpp engine for it,
    warns once, and the engine carries the reason /api/ps shows; it then serves."""
    from engines.factory import engine_for, load_with_fallback

    info = ModelInfo(name="tiny-iq4", path=str(iq4_nl_file), family="llama")
    config = EngineConfig(llama_n_threads=1, llama_n_ctx=128)
    with caplog.at_level(logging.WARNING, logger="engines.factory"):
        engine = engine_for(info, config, choose_engine(info, config, True))
    assert engine.kind == "llamacpp" and "no kernel for IQ4_NL" in engine.fallback_note
    assert any("IQ4_NL" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    engine = load_with_fallback(engine)
    try:
        request = GenerateRequest(RequestKind.COMPLETION, SamplingParams(max_tokens=3, temperature=0.0), prompt="ab")
        assert list(engine.generate(request))[-1].finish_reason
        assert "IQ4_NL" in engine.fallback_note
    finally:
        engine.unload()


def test_torch_loader_refuses_a_type_without_kernel(iq4_nl_file):
    """Forced onto torch anyway (an override), the load fails with a typed error
    naming the type (load_with_fallback then hands it to llama.cpp), not a bf16 copy."""
    from engines.torch.load.gguf_loader import load_gguf

    with pytest.raises(ModelLoadError, match="no kernel for IQ4_NL"):
        load_gguf(iq4_nl_file, "cpu", llamacpp_numerics=False)
