"""Load a Hugging Face model folder (config.json + *.safetensors) into the torch model.

Parameter names already match the model's (HF names), so loading is reading
each tensor through the `safetensors` library straight onto the target device
(`safe_open(..., device=...)`), casting, and checking that nothing is missing.
Sharded folders (model-00001-of-00004.safetensors...) are read shard by shard.
Weights are in HF layout (rotate-half RoPE): no permutation to undo. Two
family details are applied here (`hf_layout`): Gemma checkpoints store each
norm weight minus one (GGUF files hold the sum), and MoE checkpoints store one
tensor per expert (Mixtral under `block_sparse_moe` with w1/w3/w2), which the
model keeps stacked [E, out, in].
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from engines.errors import ModelLoadError
from engines.torch.load.gguf_loader import default_dtype
from engines.torch.load.hf_layout import to_model_layout
from engines.torch.model.configs import ModelConfig
from engines.torch.model.hf_config import from_hf_config
from engines.torch.model.model import LlamaModel, build_model

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that the model computes itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    try:
        return from_hf_config(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} has no config.json") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None


def load_safetensors_state(folder: Path, device: torch.device | str, dtype: torch.dtype,
                           progress: Callable[[float], None] | None = None
                           ) -> dict[str, torch.Tensor]:
    import safetensors
    from safetensors import safe_open

    # Named SafetensorError in the package root since 0.4; older ones raise OSError-likes.
    bad_file = (getattr(safetensors, "SafetensorError", OSError), OSError)

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    dev = str(torch.device(device))
    for i, file in enumerate(files):
        try:
            with safe_open(str(file), framework="pt", device=dev) as f:
                for name in f.keys():
                    if not name.endswith(_IGNORED_SUFFIXES):
                        state[name] = f.get_tensor(name).to(dtype)
        except bad_file as exc:
            raise ModelLoadError(f"{file.name} is not a readable safetensors file: {exc}") from None
        if progress is not None:
            progress((i + 1) / len(files))
    return state


def load_safetensors(folder: str | Path, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None,
                     progress: Callable[[float], None] | None = None) -> LlamaModel:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"not a model folder: {folder}")
    cfg = read_hf_config(folder)
    dtype = dtype or default_dtype(device)
    state = to_model_layout(load_safetensors_state(folder, device, dtype, progress), cfg)
    if "lm_head.weight" not in state and not cfg.tie_embeddings:
        # Some exports tie without saying so in config.json.
        cfg = cfg.replace(tie_embeddings=True)
    model = build_model(cfg, state, device, dtype)
    log.info("loaded %s: %d layers, dim %d, %s on %s", folder.name, cfg.num_layers, cfg.dim,
             dtype, device)
    return model
