"""A GGUF's block-quantized weights as `QuantWeight`s: they stay in their blocks.

Every 2-D weight of a block type (Q4_0 ... Q6_K: `quant_weight.BLOCK_TYPES`)
becomes a `QuantWeight` on the target device, rows as the file stores them; the
model then holds it in a QuantLinear or QuantEmbedding (engines.torch.quant).
Float weights (F32, F16, BF16) stay dense parameters of the model's dtype:
cuBLAS is the best kernel for them and they take no more bytes.

Each weight's bytes are read once from the memory-mapped file and copied to the
device through pinned buffers (staged_upload.py); on the raw rows there, before
any repacking:
- llama.cpp's Q/K row permutation is undone (`unpermute_qk` moves whole rows,
  so it acts on block rows as on floats);
- q/k/v and gate/up whose types match are concatenated into one weight
  (`qkv_proj`, `gate_up_proj`), each part copied into its slice: rows are
  independent in every GGUF type, so the fused weight is exact and one kernel
  reads it. Where types differ (Q4_K_M keeps some attn_v in Q6_K) they stay apart.

Stacked experts (ffn_*_exps, [E, out, in]) are one weight of E * out rows, as the
file stores them (engines.torch.kernels.quant_experts reads them by expert). Gate and
up stacks of one type become one `experts.gate_up_proj` of E * 2 out rows, interleaved
by expert (expert e's gate rows, then its up rows): one launch reads a pair's gate and
up, writing the [gate | up] row the down projection reads gated (one launch a layer
fewer: benchmarks/results/README.md has what it saved). A
weight of a type with no kernel (IQ*, TQ*, MXFP4...) is a ModelLoadError: engines.choice routes such files to llama.cpp
before they get here, and engines.factory falls back if one does.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engines.errors import ModelLoadError
from engines.torch.kernels.quant_weight import BLOCK_TYPES, SUPPORTED_TYPES, QuantWeight, interleave_stacks
from engines.torch.load.gguf_names import hf_name
from engines.torch.load.staged_upload import StagedUpload
from engines.torch.model.configs import ModelConfig
from engines.torch.model.families import family

log = logging.getLogger(__name__)

# (parent module, parts in output order) -> the fused module's name
FUSED_GROUPS: dict[tuple[str, tuple[str, ...]], str] = {
    ("self_attn", ("q_proj", "k_proj", "v_proj")): "qkv_proj",
    ("mlp", ("gate_proj", "up_proj")): "gate_up_proj",
    ("experts", ("gate_proj", "up_proj")): "gate_up_proj",
}


def is_block_tensor(tensor: Any) -> bool:
    """Whether the tensor is a weight that stays in blocks (else: dense, or an error)."""
    type_name = tensor.tensor_type.name
    if type_name in ("F32", "F16", "BF16"):
        return False
    if type_name not in SUPPORTED_TYPES:
        raise ModelLoadError(f"tensor {tensor.name}: the torch engine has no kernel for {type_name}")
    if len(tensor.shape) != (3 if is_experts(tensor) else 2):
        raise ModelLoadError(f"tensor {tensor.name}: {type_name} blocks of {len(tensor.shape)} dimensions "
                             "are not a weight the torch engine reads")
    return type_name in BLOCK_TYPES


def is_experts(tensor: Any) -> bool:
    """A stack of experts [E, out, in] (ffn_gate_exps...): kept as one weight of E * out rows."""
    return "_exps." in tensor.name


@dataclass
class _Rows:
    """One weight as it will sit on the device: its parts' GGUF tensors, in order (one,
    or a fused group's), each with the head count its Q/K rows are un-permuted by."""
    type_name: str
    in_features: int
    row_bytes: int
    parts: list[tuple[Any, int | None]]
    experts: int = 0      # stacked experts: parts interleaved by expert on the device

    def shape_key(self) -> tuple:
        """What parts must share to be fused: type, row width, and the stack's experts."""
        return self.type_name, self.in_features, self.row_bytes, self.experts

    @property
    def rows(self) -> int:
        return sum(_row_count(tensor) for tensor, _ in self.parts)


def _row_count(tensor: Any) -> int:
    """Rows of the weight as stored: out, or E * out for stacked experts (GGUF dims run in, out, E)."""
    return math.prod(int(dim) for dim in tensor.shape[1:])


def _rows_of(tensor: Any, cfg: ModelConfig, name: str) -> _Rows:
    rows = _row_count(tensor)
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(name.split(".")[-2])
    permuted = family(cfg.arch).permuted_qk and heads is not None
    return _Rows(tensor.tensor_type.name, int(tensor.shape[0]), int(tensor.data.nbytes) // rows,
                 [(tensor, heads if permuted else None)], int(tensor.shape[2]) if is_experts(tensor) else 0)


def _fuse(weights: dict[str, _Rows]) -> dict[str, list[str]]:
    """Merge, in place, each fusable group whose parts share one type and width (their rows
    are concatenated on the device). Returns fused module -> its parts' modules."""
    fused: dict[str, list[str]] = {}
    for name in [n for n in weights if n.startswith("model.layers.")]:
        prefix, parent, module, _ = name.rsplit(".", 3)
        for (group_parent, parts), target in FUSED_GROUPS.items():
            if (parent, module) != (group_parent, parts[0]):
                continue
            modules = [f"{prefix}.{parent}.{p}" for p in parts]
            entries = [weights.get(f"{m}.weight") for m in modules]
            if any(e is None for e in entries) or len({e.shape_key() for e in entries}) != 1:
                continue
            for m in modules:
                del weights[f"{m}.weight"]
            first = entries[0]
            weights[f"{prefix}.{parent}.{target}.weight"] = _Rows(
                first.type_name, first.in_features, first.row_bytes, [p for e in entries for p in e.parts],
                first.experts)
            fused[f"{prefix}.{parent}.{target}"] = modules
    return fused


def _upload(weight: _Rows, upload: StagedUpload, device: torch.device | str) -> torch.Tensor:
    """The weight's raw rows on the device: each part's bytes read once from the memory map
    into its slice, its Q/K rows un-permuted there."""
    from engines.torch.load.gguf_loader import unpermute_qk

    raw = torch.empty((weight.rows, weight.row_bytes), dtype=torch.uint8, device=device)
    at = 0
    for tensor, heads in weight.parts:
        part = raw[at:at + _row_count(tensor)]
        upload.copy(tensor.data, part)
        if heads is not None:
            part.copy_(unpermute_qk(part, heads))   # a new tensor first: no aliasing
        at += part.shape[0]
    if weight.experts and len(weight.parts) > 1:
        return interleave_stacks(raw, len(weight.parts), weight.experts)
    return raw


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
    weights: dict[str, _Rows] = {}
    taken: set[str] = set()
    for tensor in reader.tensors:
        name = hf_name(tensor.name, cfg.arch)
        if name is None or not is_block_tensor(tensor):
            continue
        weights[name] = _rows_of(tensor, cfg, name)
        taken.add(tensor.name)
    fused = _fuse(weights)
    quant: dict[str, QuantWeight] = {}
    started = time.monotonic()
    with StagedUpload(device) as upload:
        # One weight at a time: the file is memory-mapped, and the host holds no more than
        # the two pinned chunks of staged_upload.
        for i, (name, weight) in enumerate(weights.items()):
            raw = _upload(weight, upload, device)
            try:
                quant[name] = QuantWeight.from_gguf(raw, weight.type_name, (weight.rows, weight.in_features), device)
            except ValueError as exc:
                raise ModelLoadError(f"{name}: {exc}") from None
            if progress is not None:
                progress((i + 1) / len(weights))
    seconds = time.monotonic() - started
    log.info("%d quantized weights to %s: %.2f GB in %.2f s (%.2f GB/s)", len(quant), device,
             upload.bytes_copied / 1e9, seconds, upload.bytes_copied / 1e9 / max(seconds, 1e-9))
    return quant, fused, taken
