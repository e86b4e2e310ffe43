"""Which engine serves a model, and why: one routing table.

A per-model override in settings wins (EngineConfig.engine_overrides, then
default_engine). Otherwise the device picks (torch on a CUDA GPU, llama.cpp on
the CPU), and a model the torch engine cannot run goes to llama.cpp with the
reason in words. What the torch engine cannot run is read from the file, not
guessed from its name: `TORCH_CHECKS` runs over the GGUF header (architecture,
tensor list, tensor types) without loading a byte of weights:

- an architecture it does not implement (engines.torch.model.families);
- tensors no module of that family takes (an old per-expert Mixtral file, a
  vision tower, a layout a converter changed): the loader would refuse them;
- tensor types it has no kernel for: its GGUF weights stay in their blocks
  on the GPU (engines.torch.load.gguf_quant), so a type without a kernel
  (IQ*, TQ*, MXFP4...) goes to llama.cpp, never to a silent dequantization that
  would take four times the memory. Experts stacked in blocks have their kernel
  (engines.torch.kernels.quant_experts).

A model the device's default engine cannot serve is a detour (`Choice.is_detour`):
engines.factory logs it as a warning and puts the reason in the engine's note
(/api/ps, /control/models, `ebbtide ps`).

A Mixtral GGUF declares `llama`; its experts (ffn_gate_inp + ffn_*_exps) are
implemented, so it goes to torch on a GPU like any Llama. Whatever this table
lets through and the torch engine still fails to load is loaded by llama.cpp
instead (engines.factory.load_with_fallback): never an error for the user.
Synthetic models (random weights, benchmarks) exist only for torch. Whether
the device is a CUDA GPU is passed in (the daemon decided it once, opening its
kvcached backend), so tests choose for either machine; no torch is imported
here.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.errors import ModelLoadError
from engines.torch.load.gguf_names import unknown_tensors
from engines.torch.model.families import FAMILIES

log = logging.getLogger(__name__)

# The engine each device runs best (measured: benchmarks/engine_compare.py).
ENGINE_BY_DEVICE: dict[str, str] = {"cuda": "torch", "cpu": "llamacpp"}
# Sources only one engine can load.
ENGINE_BY_SOURCE: dict[str, str] = {"synthetic": "torch", "remote": "remote"}
TORCH_FAMILIES = tuple(FAMILIES)


@dataclass(frozen=True)
class Choice:
    engine: str     # "torch" | "llamacpp"
    reason: str     # for logs and `ebbtide models`: why this engine
    is_detour: bool = False   # the device's own engine cannot serve it: say so where the user looks


@dataclass(frozen=True)
class FileFacts:
    """What the routing reads of a model: its family, tensors by name -> GGML type code."""
    family: str
    tensors: dict[str, int]


@functools.lru_cache(maxsize=256)
def _gguf_facts(path: str, mtime: float, size: int) -> FileFacts:
    from engines.registry.gguf_meta import read_gguf_meta

    meta = read_gguf_meta(path)
    return FileFacts(meta.architecture, meta.tensors)


def file_facts(info: ModelInfo) -> FileFacts | None:
    """The GGUF header's facts (cached per file version); None for folders and synthetic models."""
    path = Path(info.path) if info.path else None
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    return _gguf_facts(str(path), stat.st_mtime, stat.st_size)


# Types whose weights the torch engine can hold unquantized: never an obstacle.
_FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


@functools.lru_cache(maxsize=1)
def torch_kernel_types() -> frozenset[str]:
    """GGML types the torch engine has kernels for. Imported here, lazily: the
    check runs only where the torch engine is the candidate (CUDA, so torch is there)."""
    from engines.torch.kernels.quant_weight import SUPPORTED_TYPES

    return frozenset(SUPPORTED_TYPES)


def _type_name(code: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(code).name
    except ValueError:
        return f"type{code}"


def _family_gap(info: ModelInfo, facts: FileFacts | None) -> str | None:
    family = facts.family if facts else info.family
    if family not in FAMILIES:
        return f"the torch engine does not implement the {family!r} family"
    return None


def _tensor_gap(info: ModelInfo, facts: FileFacts | None) -> str | None:
    if facts is None:
        return None
    unknown = unknown_tensors(list(facts.tensors), facts.family)
    if unknown:
        return f"the torch {facts.family} model does not take {len(unknown)} tensors, e.g. {unknown[0]}"
    return None


def _type_gap(info: ModelInfo, facts: FileFacts | None) -> str | None:
    if facts is None:
        return None
    types = [_type_name(code) for code in facts.tensors.values()]
    names = sorted(set(types) - torch_kernel_types())
    if names:
        count = sum(t in names for t in types)
        return (f"the torch engine has no kernel for {', '.join(names)} weights "
                f"({count} of {len(types)} tensors)")
    return None


# What keeps the torch engine from a model, checked in order: the first gap is the reason.
TORCH_CHECKS: tuple[Callable[[ModelInfo, FileFacts | None], str | None], ...] = (
    _family_gap, _tensor_gap, _type_gap)


def torch_gap(info: ModelInfo) -> str | None:
    """Why the torch engine cannot serve this model, or None where it can."""
    try:
        facts = file_facts(info)
    except (OSError, ModelLoadError) as exc:
        return f"its GGUF header cannot be read ({exc})"
    for check in TORCH_CHECKS:
        gap = check(info, facts)
        if gap:
            return gap
    return None


def torch_can_serve(info: ModelInfo) -> bool:
    return torch_gap(info) is None


def choose_engine(info: ModelInfo, config: EngineConfig, on_cuda: bool) -> Choice:
    """on_cuda: the models run on a CUDA GPU (the daemon's page pool is on one)."""
    if info.source in ENGINE_BY_SOURCE:  # before any override: no other engine can load these
        return Choice(ENGINE_BY_SOURCE[info.source], f"{info.source} models run only there")
    asked = config.engine_for(info.name)
    if asked != "auto":
        return Choice(asked, f"set for {info.name}" if info.name in config.engine_overrides
                      else "default_engine in settings")
    device = "cuda" if on_cuda else "cpu"
    engine = ENGINE_BY_DEVICE[device]
    if engine == "torch":
        gap = torch_gap(info)
        if gap:
            return Choice("llamacpp", gap, is_detour=True)
    return Choice(engine, f"the default on {'a CUDA GPU' if device == 'cuda' else 'the CPU'}")
