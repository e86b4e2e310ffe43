"""llama.cpp's CPU numerics for a loaded GGUF model: the torch engine's CPU path.

A user who switches between the llama.cpp engine and the torch engine on the
CPU expects the same answers. With float32 throughout, our logits differed from
llama.cpp's by ~0.2 on average on SmolLM2-135M Q4_1, enough to change the greedy
tokens within 32 on 8 of 10 prompts. Emulating llama.cpp's rounding alone did
not help (engines.torch.ggml.dot says why: its output is chaotic in the last
bit); computing bit for bit as its x86 kernels do matched 10 of 10
(tests/engines/test_model_greedy.py). `install` swaps the modules of a built
model (model.py stays one class for every path):

- projections -> `GgmlLinear` (Q4_1, Q8_0 exact; other quant types: activation
  rounding only, so close but not guaranteed the same tokens);
- RMSNorm, RoPE, attention, SwiGLU -> engines.torch.ggml.layers;
- the KV cache in float16 (`kv_cache_dtype`), as llama.cpp keeps it;
  GgmlAttention hands ggml's attention (ggml/attention.py) to the KV access in
  its AttnSpec, so model/attention.py runs it in place of SDPA.

Cost: several times slower than the float32 path (Python-level loops emulate
ggml's fma chains). On by default only where it applies: float32 on the CPU
with quantized weights (EngineConfig.torch_llamacpp_numerics turns it off);
never on the GPU, where weights stay bf16/fp16 dequantized.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from engines.torch.ggml.linear import GgmlLinear, WeightBlocks
from engines.torch.ggml.quant import VEC_DOT
from engines.torch.ggml.layers import GgmlAttention, GgmlMLP, GgmlRMSNorm, GgmlRotary
from engines.torch.model.model import LlamaModel, RMSNorm

log = logging.getLogger(__name__)

KV_DTYPE = torch.float16   # llama.cpp's default type_k / type_v
# Logits within this of a row's max are llama.cpp's exact sums, the rest a float32
# matmul within ~1e-4 of them (GgmlLinear._top_exact): 100x wider than that error.
HEAD_EXACT_WITHIN = 0.05
# RoPE scaling kind -> ggml's freq_scale
_ROPE_FREQ_SCALE = {"none": lambda s: 1.0, "linear": lambda s: 1.0 / s.factor}


def _f16_field(raw: np.ndarray, start: int) -> np.ndarray:
    return raw[:, start:start + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _q4_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    qs = raw[:, 4:20]
    ints = np.concatenate([qs & 0x0F, qs >> 4], axis=1)      # low nibbles: elements 0..15
    return ints.astype(np.int8), _f16_field(raw, 0), _f16_field(raw, 2)


def _q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return raw[:, 2:34].copy().view(np.int8), _f16_field(raw, 0), None


# GGML type -> (bytes per block of 32, block parser -> ints [n, 32], scales [n], mins [n] | None)
_BLOCK_PARSERS = {"Q4_1": (20, _q4_1), "Q8_0": (34, _q8_0)}


def weight_blocks(tensor: Any) -> WeightBlocks | None:
    """A GGUF weight's integers, scales and minimums, rows first (None: a type
    ggml_dot does not reproduce)."""
    entry = _BLOCK_PARSERS.get(tensor.tensor_type.name)
    if entry is None or len(tensor.shape) != 2:
        return None
    size, parse = entry
    rows = int(tensor.shape[1])
    ints, scales, mins = parse(np.asarray(tensor.data).reshape(-1, size))
    return WeightBlocks(torch.from_numpy(np.ascontiguousarray(ints)).reshape(rows, -1, 32),
                        torch.from_numpy(scales).reshape(rows, -1),
                        None if mins is None else torch.from_numpy(mins).reshape(rows, -1))


def is_applicable(type_names: set[str], device: torch.device | str, dtype: torch.dtype) -> bool:
    """On by default where it means something: float32 on the CPU and at least one
    projection weight of a type llama.cpp multiplies by rounded activations."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and bool(type_names & VEC_DOT.keys())


def uses_llamacpp_numerics(model: torch.nn.Module) -> bool:
    return any(isinstance(m, GgmlLinear) for m in model.modules())


def kv_cache_dtype(model: LlamaModel) -> torch.dtype:
    """The KV cache type that goes with the model's numerics."""
    return KV_DTYPE if uses_llamacpp_numerics(model) else model.dtype


def install(model: LlamaModel, linears: dict[str, tuple[str, WeightBlocks | None]],
            permuted_qk: bool) -> LlamaModel:
    """Swap the modules in place. linears: module name -> (GGML type name, the
    weight's blocks in the model's row order, or None); permuted_qk: the file's
    Q/K rows are in convert_hf_to_gguf.py's interleaved order (llama, mistral)."""
    for name, (type_name, blocks) in linears.items():
        if type_name not in VEC_DOT:
            continue
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, GgmlLinear.wrap(getattr(owner, attr), type_name, blocks))
    if isinstance(model.lm_head, GgmlLinear):
        model.lm_head.exact_within = HEAD_EXACT_WITHIN
    for name, module in list(model.named_modules()):
        if type(module) is RMSNorm:
            parent, _, attr = name.rpartition(".")
            norm = GgmlRMSNorm(module.weight.shape[0], module.eps)
            norm.weight = module.weight
            setattr(model.get_submodule(parent) if parent else model, attr, norm)
    for layer in model.model.layers:
        layer.mlp = GgmlMLP(layer.mlp)
    scaling = model.cfg.rope_scaling
    if scaling.kind in _ROPE_FREQ_SCALE:   # llama3 (per-frequency factors) keeps the model's own RoPE
        cfg = model.cfg
        model.rotary = GgmlRotary(cfg.head_dim, cfg.rope_theta, _ROPE_FREQ_SCALE[scaling.kind](scaling))
        for layer in model.model.layers:
            layer.self_attn = GgmlAttention(layer.self_attn, interleaved=permuted_qk)
    log.info("llama.cpp CPU numerics: %d projections", sum(isinstance(m, GgmlLinear) for m in model.modules()))
    return model
