"""Random weights from a named config, made on the target device directly.

For benchmarks: no weights can be downloaded here, and decode speed depends on
shapes and bytes, not on values. Weights are drawn N(0, 0.02) like a fresh
init (norms at 1), so activations stay finite and attention is not degenerate.
Generated in float32 on the device then cast, layer by layer, so an 8B model
needs no host memory and no float32 copy of the whole model.
"""
from __future__ import annotations

import torch

from engines.torch.model.configs import ModelConfig, named_config
from engines.torch.load.gguf_loader import default_dtype
from engines.torch.model.model import LlamaModel, build_model


def synthetic_state(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random tensors for cfg (1-D weights, i.e. norms, are ones; biases small)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaModel(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator(device=device).manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, device=device, dtype=dtype)
            continue
        std = 0.002 if name.endswith(".bias") else 0.02
        t = torch.empty(shape, device=device, dtype=torch.float32)
        state[name] = t.normal_(0.0, std, generator=gen).to(dtype)
        del t
    return state


def synthetic_model(name_or_cfg: str | ModelConfig, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, seed: int = 0) -> LlamaModel:
    """A model with random weights: `synthetic_model("llama-3.1-8b", "cuda")`."""
    cfg = named_config(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    dtype = dtype or default_dtype(device)
    return build_model(cfg, synthetic_state(cfg, device, dtype, seed), device, dtype)
