"""A GGUF's block-quantized weights as `QuantWeight`s: they stay in their blocks.

Every 2-D weight of a block type (Q4_0 ... Q6_K: `quant_weight.BLOCK_TYPES`)
becomes a `QuantWeight` on the target device, rows as the file stores them; the
model then holds it in a QuantLinear or QuantEmbedding (engines.torch.quant).
Float weights (F32, F16, BF16) stay dense parameters of the model's dtype:
cuBLAS is the best kernel for them and they take no more bytes.

On the raw rows, before any repacking:
- llama.cpp's Q/K row permutation is undone (`unpermute_qk` moves whole rows,
  so it acts on block rows as on floats);
- q/k/v and gate/up whose types match are concatenated into one weight
  (`qkv_proj`, `gate_up_proj`): rows are independent in every GGUF type, so
  the fused weight is exact and one kernel reads it. Where types differ
  (Q4_K_M keeps some attn_v in Q6_K) they stay apart.

A weight of a type with no kernel (IQ*, TQ*, MXFP4...) or stacked experts in
blocks is a ModelLoadError: engines.choice routes such files to llama.cpp
before they get here, and engines.factory falls back if one does.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from engines.errors import ModelLoadError
from engines.torch.kernels.quant_weight import BLOCK_TYPES, SUPPORTED_TYPES, QuantWeight
from engines.torch.load.gguf_names import hf_name
from engines.torch.model.configs import ModelConfig
from engines.torch.model.families import family

# (parent module, parts in output order) -> the fused module's name
FUSED_GROUPS: dict[tuple[str, tuple[str, ...]], str] = {
    ("self_attn", ("q_proj", "k_proj", "v_proj")): "qkv_proj",
    ("mlp", ("gate_proj", "up_proj")): "gate_up_proj",
}


def is_block_tensor(tensor: Any) -> bool:
    """Whether the tensor is a weight that stays in blocks (else: dense, or an error)."""
    type_name = tensor.tensor_type.name
    if type_name in ("F32", "F16", "BF16"):
        return False
    if type_name not in SUPPORTED_TYPES:
        raise ModelLoadError(f"tensor {tensor.name}: the torch engine has no kernel for {type_name}")
    if len(tensor.shape) != 2:
        raise ModelLoadError(f"tensor {tensor.name}: {type_name} stacked experts have no kernel "
                             "in the torch engine yet")
    return type_name in BLOCK_TYPES


def _raw_rows(tensor: Any, cfg: ModelConfig, name: str) -> np.ndarray:
    """uint8 [out, row_bytes] in the model's row order."""
    rows = np.asarray(tensor.data).reshape(int(tensor.shape[1]), -1)
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
    proj = name.split(".")[-2]
    if family(cfg.arch).permuted_qk and proj in heads:
        from engines.torch.load.gguf_loader import unpermute_qk

        rows = unpermute_qk(rows, heads[proj])
    return rows


def _fuse(raw: dict[str, tuple[str, np.ndarray, int]]) -> dict[str, list[str]]:
    """Concatenate, in place, each fusable group whose parts share one type and width.
    raw: HF weight name -> (type, rows, in_features). Returns fused module -> its parts' modules."""
    fused: dict[str, list[str]] = {}
    for name in [n for n in raw if n.startswith("model.layers.")]:
        prefix, parent, module, _ = name.rsplit(".", 3)
        for (group_parent, parts), target in FUSED_GROUPS.items():
            if (parent, module) != (group_parent, parts[0]):
                continue
            modules = [f"{prefix}.{parent}.{p}" for p in parts]
            entries = [raw.get(f"{m}.weight") for m in modules]
            if any(e is None for e in entries) or len({(e[0], e[2]) for e in entries}) != 1:
                continue
            for m in modules:
                del raw[f"{m}.weight"]
            raw[f"{prefix}.{parent}.{target}.weight"] = (entries[0][0], np.concatenate([e[1] for e in entries]),
                                                         entries[0][2])
            fused[f"{prefix}.{parent}.{target}"] = modules
    return fused


def fuse_biases(state: dict[str, torch.Tensor], fused: dict[str, list[str]]) -> None:
    """The fused modules' biases (Qwen2's q/k/v): the parts' biases concatenated, in place."""
    for target, modules in fused.items():
        if f"{modules[0]}.bias" in state:
            state[f"{target}.bias"] = torch.cat([state.pop(f"{m}.bias") for m in modules])


def read_quant_weights(reader: Any, cfg: ModelConfig, device: torch.device | str,
                       progress: Callable[[float], None] | None = None
                       ) -> tuple[dict[str, QuantWeight], dict[str, list[str]], set[str]]:
    """(HF weight name -> QuantWeight on device, fused module -> parts, the GGUF tensor
    names read here: the dense loader skips them)."""
    raw: dict[str, tuple[str, np.ndarray, int]] = {}
    taken: set[str] = set()
    for tensor in reader.tensors:
        name = hf_name(tensor.name, cfg.arch)
        if name is None or not is_block_tensor(tensor):
            continue
        raw[name] = (tensor.tensor_type.name, _raw_rows(tensor, cfg, name), int(tensor.shape[0]))
        taken.add(tensor.name)
    fused = _fuse(raw)
    quant: dict[str, QuantWeight] = {}
    for i, (name, (type_name, rows, in_features)) in enumerate(raw.items()):
        # One tensor at a time crosses to the device: the file is memory-mapped, so the
        # host holds at most one tensor's (or one fused group's) bytes.
        host = torch.from_numpy(np.array(rows))          # its own contiguous copy of the map
        try:
            quant[name] = QuantWeight.from_gguf(host, type_name, (rows.shape[0], in_features), device)
        except ValueError as exc:
            raise ModelLoadError(f"{name}: {exc}") from None
        if progress is not None:
            progress((i + 1) / len(raw))
    return quant, fused, taken
