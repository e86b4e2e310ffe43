"""Mixture-of-experts files whose experts are stacked in GGUF blocks (issue 17): they load on
the torch engine with the experts kept in blocks (QuantExperts), route there, and compute
what llama.cpp computes on the very same file; both CUDA paths of quant_experts_forward (per
expert hit when eager, every (token, expert) pair in one launch inside a graph) equal the
dense experts over the same dequantized weights."""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_families_llamacpp import PROMPT, llamacpp_run, torch_run, N_CTX  # noqa: E402
from tiny_families import FAMILY_CASES, random_state, write_family_gguf  # noqa: E402

from engines.base import ModelInfo  # noqa: E402
from engines.choice import choose_engine  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.torch.kernels.quant_weight import QuantWeight  # noqa: E402
from engines.torch.load.gguf_loader import load_gguf, open_reader  # noqa: E402
from engines.torch.model import moe  # noqa: E402
from engines.torch.kernels.quant_experts import stack_gate_up  # noqa: E402
from engines.torch.quant.modules import QuantExperts  # noqa: E402
from tests.engines.quant_blocks import block_bytes  # noqa: E402

Q8_0 = 7   # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0


def _q8_file(tmp_path: Path, name: str) -> Path:
    llama_cpp = pytest.importorskip("llama_cpp")
    cfg, extra = FAMILY_CASES[name]
    f32 = write_family_gguf(tmp_path / f"{name}.gguf", cfg, extra, random_state(cfg, seed=len(name)))
    out = tmp_path / f"{name}.Q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = Q8_0
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


@pytest.mark.parametrize("name", ["qwen3moe", "mixtral"])
def test_experts_in_blocks_load_route_and_match_llamacpp(tmp_path, name):
    path = _q8_file(tmp_path, name)
    stacked = {t.name: t.tensor_type.name for t in open_reader(path).tensors if "_exps." in t.name}
    assert stacked and set(stacked.values()) == {"Q8_0"}
    info = ModelInfo(name=name, path=str(path), family=name)
    choice = choose_engine(info, EngineConfig(), on_cuda=True)
    assert choice.engine == "torch", choice.reason
    model, _ = load_gguf(path, dtype=torch.float32)
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    # gate and up of one type: one stack of [gate_e | up_e] rows an expert (gguf_quant), and down
    assert len(experts) == 2 * model.cfg.num_layers and all(e.qweight.type_name == "Q8_0" for e in experts)
    first = model.model.layers[0].mlp.experts
    assert first.gate_up_proj.out_features == 2 * first.down_proj.in_features
    model.fit_context(N_CTX)
    ours, ours_tokens = torch_run(model)
    ref, ref_tokens = llamacpp_run(path)
    # llama.cpp rounds activations to 8 bits for its Q8_0 dot products; we multiply in float32.
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999
    assert sum(a == b for a, b in zip(ours_tokens, ref_tokens)) >= len(ref_tokens) // 2


def _stack(type_name: str, experts: int, out: int, inp: int, seed: int) -> QuantExperts:
    raw = block_bytes(type_name, experts * out, inp, seed)
    w = QuantWeight.from_gguf(torch.from_numpy(raw.copy()), type_name, (experts * out, inp), "cpu")
    return QuantExperts(w, experts, torch.float32)


@pytest.mark.parametrize("stacked", [False, True])      # gate and up apart, or the loader's one stack
@pytest.mark.parametrize("in_graph", [False, True])
def test_both_cuda_paths_equal_the_dense_experts(monkeypatch, in_graph, stacked):
    torch.manual_seed(0)
    experts, dim, ffn = 4, 256, 256
    gate, up, down = (_stack("Q4_K", experts, o, i, s) for o, i, s in ((ffn, dim, 1), (ffn, dim, 2), (dim, ffn, 3)))
    x = torch.randn(3, dim)
    ids = torch.tensor([[0, 2], [3, 2], [1, 0]])   # top-k: distinct experts per token
    weights = torch.softmax(torch.randn(3, 2), -1)
    act = torch.nn.functional.silu
    monkeypatch.setattr(moe, "_must_not_sync", lambda x: in_graph)
    gate_up = (QuantExperts(stack_gate_up(gate.qweight, up.qweight, experts), experts, torch.float32),) \
        if stacked else (gate, up)
    got = moe.quant_experts_forward(x, ids, weights, gate_up, down, "silu")
    want = moe._dense(x, ids, weights, gate.weight, up.weight, down.weight, act)
    # float32 sums in another order over random blocks' large values: relative to the largest
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
