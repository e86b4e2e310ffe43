"""The routing table (engines.choice) over every architecture llama.cpp names, and the
fallback to llama.cpp when the torch engine fails to load a file.

For each name in gguf-py's MODEL_ARCH_NAMES (llama.cpp's own list), a GGUF is
written with that architecture and the tensors llama.cpp lists for it (one
layer, tiny shapes: the routing reads only the header). On a CUDA machine the
choice is either the torch engine, for a family it implements (and each of
those loads and matches llama.cpp in test_families_llamacpp.py), or llama.cpp
with a reason in words; it never raises.
"""
from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_families import FAMILY_CASES, random_state, write_family_gguf  # noqa: E402

from engines.base import ModelInfo  # noqa: E402
from engines.choice import choose_engine  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.types import GenerateRequest, RequestKind, SamplingParams  # noqa: E402

TESTED_FAMILIES = {cfg.arch for cfg, _ in FAMILY_CASES.values()}


def write_header_gguf(path: Path, arch: str, tensor_names: list[str],
                      dtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for name in tensor_names:
        if dtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.zeros((2, 2), dtype=np.float32))
        else:   # raw blocks of the type: 32 values a row, one row
            w.add_tensor(name, gguf.quants.quantize(np.zeros((1, 32), np.float32), dtype), raw_dtype=dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def arch_tensor_names(arch_name: str) -> list[str]:
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = [gguf.TENSOR_NAMES[t].format(bid=0) for t in gguf.MODEL_TENSORS.get(arch, [])]
    return list(dict.fromkeys(n if n.endswith((".weight", ".bias")) else n + ".weight" for n in names))


def choose(path: Path, arch: str, has_cuda: bool = True):
    info = ModelInfo(name=path.stem, path=str(path), family=arch)
    return choose_engine(info, EngineConfig(), has_cuda)


@pytest.mark.parametrize("arch", sorted(gguf.MODEL_ARCH_NAMES.values()))
def test_every_llamacpp_architecture_is_routed_with_a_reason(tmp_path, arch):
    path = write_header_gguf(tmp_path / f"{arch}.gguf", arch, arch_tensor_names(arch))
    choice = choose(path, arch)
    if choice.engine == "torch":
        assert arch in TESTED_FAMILIES, f"{arch} goes to torch but no test loads it against llama.cpp"
        assert choice.reason == "the default on a CUDA GPU"
    else:
        assert choice.engine == "llamacpp" and len(choice.reason) > 20, choice
    assert choose(path, arch, has_cuda=False).engine == "llamacpp"


def test_mixtral_routes_by_its_tensors(tmp_path):
    """A Mixtral GGUF says `llama`: stacked experts are implemented (torch); the old
    per-expert layout is not, and goes to llama.cpp naming a tensor."""
    stacked = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_gate_inp.weight",
               "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight"]
    assert choose(write_header_gguf(tmp_path / "new.gguf", "llama", stacked), "llama").engine == "torch"
    per_expert = stacked[:3] + [f"blk.0.ffn_{p}.{e}.weight" for p in ("gate", "up", "down") for e in range(2)]
    old = choose(write_header_gguf(tmp_path / "old.gguf", "llama", per_expert), "llama")
    assert old.engine == "llamacpp" and "blk.0.ffn_down.0.weight" in old.reason


def test_unreadable_header_is_a_reason_not_an_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    choice = choose(path, "llama")
    assert choice.engine == "llamacpp" and "header" in choice.reason


def test_torch_load_failure_falls_back_to_llamacpp(tmp_path, caplog):
    """Any failure of the torch engine (here: a KV budget that holds not one page)
    loads the same file with llama.cpp, with a log line and a note for /api/ps."""
    pytest.importorskip("llama_cpp")
    from engines.factory import load_with_fallback
    from engines.torch.engine import TorchEngine

    cfg, extra = FAMILY_CASES["qwen3"]
    path = write_family_gguf(tmp_path / "qwen3.gguf", cfg, extra, random_state(cfg))
    info = ModelInfo(name="tiny-qwen3", path=str(path), family="qwen3")
    from kvcached.config import KvcachedConfig
    from kvcached.standalone import standalone_pool

    config = EngineConfig(llama_n_threads=1, llama_n_ctx=128)
    engine = load_with_fallback(TorchEngine(info, config, standalone_pool(KvcachedConfig(budget_bytes=0))))
    try:
        assert engine.kind == "llamacpp" and "torch engine failed" in engine.fallback_note
        assert any("served by llama.cpp" in r.getMessage() for r in caplog.records)
        request = GenerateRequest(RequestKind.COMPLETION, SamplingParams(max_tokens=3, temperature=0.0), prompt="ab")
        chunks = list(engine.generate(request))
        assert chunks[-1].finish_reason
    finally:
        engine.unload()
