"""Tiny random-weight GGUFs of every family the torch engine serves, written as
convert_hf_to_gguf.py writes them (engines.torch.load.gguf_writer): the family's llama.cpp tensor names (every
special tensor: q/k norms, post-norms, fused qkv and gate_up, LongRoPE factors,
router and stacked experts, norm and projection biases), its metadata keys and
shapes, a few layers, small dims. llama.cpp runs the very same file as the
reference (tests/engines/test_families_llamacpp.py).

`FAMILY_CASES` is the table: name -> (ModelConfig, extra GGUF metadata). The
configs carry what each family's math needs; the writer states it the way the
family's files do, so the loader's reading of real files is what is tested.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import torch

from engines.torch.load.gguf_writer import gguf_tensor_name, write_gguf
from engines.torch.model.configs import ModelConfig, sliding_pattern
from engines.torch.model.model import LlamaModel
from engines.torch.model.rope import RopeScaling

BASE = ModelConfig(vocab_size=320, dim=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                   ffn_dim=192, rope_theta=10000.0, rms_eps=1e-5, max_context=512, bos_id=256, eos_ids=(257,))
_PHI_ROPE = RopeScaling("longrope", 16.0, original_max_position=32,
                        attn_factor=math.sqrt(1 + math.log(16) / math.log(32)),
                        long_factors=tuple(1.0 + 0.37 * i for i in range(12)),
                        short_factors=tuple(1.0 + 0.05 * i for i in range(12)))
_GEMMA = dict(sandwich_norms=True, activation="gelu_tanh", embed_scale=math.sqrt(128), rms_eps=1e-6,
              tie_embeddings=True)

# name -> (config, GGUF metadata the family's converter writes beyond the common keys)
FAMILY_CASES: dict[str, tuple[ModelConfig, dict[str, Any]]] = {
    "llama-yarn": (BASE.replace(rope_scaling=RopeScaling("yarn", 4.0, original_max_position=16)), {
        "rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 16}),
    "mistral-window": (BASE.replace(layer_windows=(4096,) * 3), {"attention.sliding_window": 4096}),
    "mixtral": (BASE.replace(num_experts=4, num_experts_used=2, ffn_dim=96), {
        "expert_count": 4, "expert_used_count": 2}),
    "qwen2": (BASE.replace(arch="qwen2", qkv_bias=True, tie_embeddings=True, rms_eps=1e-6), {}),
    "qwen3": (BASE.replace(arch="qwen3", qk_norm=True, head_dim=48, rms_eps=1e-6), {}),
    "qwen3moe": (BASE.replace(arch="qwen3moe", qk_norm=True, num_experts=8, num_experts_used=3, ffn_dim=64), {
        "expert_count": 8, "expert_used_count": 3, "expert_feed_forward_length": 64}),
    # soft-caps far below Gemma 2's 50 and 30, so that tanh really bends these scores
    "gemma2": (BASE.replace(arch="gemma2", **_GEMMA, attn_softcap=1.5, final_softcap=2.5,
                            layer_windows=sliding_pattern(3, 6, 2), head_dim=64), {
        "attention.sliding_window": 6, "attn_logit_softcapping": 1.5, "final_logit_softcapping": 2.5}),
    "gemma3": (BASE.replace(arch="gemma3", **_GEMMA, qk_norm=True, num_layers=7, rope_theta=1e6,
                            rope_theta_local=10000.0, rope_scaling=RopeScaling("linear", 8.0),
                            layer_windows=sliding_pattern(7, 6, 6)), {
        "attention.sliding_window": 6, "rope.scaling.type": "linear", "rope.scaling.factor": 8.0}),
    "phi3": (BASE.replace(arch="phi3", fused_qkv=True, fused_gate_up=True, rope_dim=24,
                          rope_scaling=_PHI_ROPE, max_context=512), {
        "rope.scaling.attn_factor": _PHI_ROPE.attn_factor, "rope.scaling.original_context_length": 32}),
    "starcoder2": (BASE.replace(arch="starcoder2", norm="layer", activation="gelu_tanh", gated_mlp=False,
                                qkv_bias=True, o_bias=True, mlp_bias=True), {}),
}


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named float32 weights, scaled so activations stay O(1) across layers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaModel(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight")
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            state[name] = 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("embed_tokens.weight") and cfg.embed_scale != 1.0:
            state[name] = torch.randn(shape, generator=gen) / cfg.embed_scale     # Gemma scales it back up
        else:
            state[name] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    return state


def gguf_name(hf: str, arch: str) -> str:
    return gguf_tensor_name(hf, arch)


def write_family_gguf(path: Path, cfg: ModelConfig, extra: dict[str, Any], state: dict[str, torch.Tensor],
                      dtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
                      chat_template: str = "") -> Path:
    """cfg/state as a GGUF of cfg.arch; 2-D and 3-D weights as `dtype` (F32 or F16);
    chat_template: the family's Jinja template (tests/app/family_templates.py), as its files carry."""
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    return write_gguf(path, cfg, extra, shapes, lambda name, _: state[name].float().numpy(),
                      float16=dtype == gguf.GGMLQuantizationType.F16, chat_template=chat_template)
