"""Which engine serves a model: torch on a CUDA GPU, llama.cpp on the CPU, overridable.

A per-model override in settings wins (EngineConfig.engine_overrides, then
default_engine). Otherwise the device picks from a table, and a model the
torch engine cannot run (a family it does not implement) goes to llama.cpp.
Synthetic models (random weights from a named config, for benchmarks) exist
only for torch. Whether CUDA is present is passed in, so tests choose for
either machine; by default it is asked of torch, without initialising CUDA
when torch is not installed.
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

from engines.base import ModelInfo
from engines.config import EngineConfig
from engines.torch.model.configs import SUPPORTED_ARCHS as TORCH_FAMILIES

log = logging.getLogger(__name__)

# The engine each device runs best (measured: benchmarks/engine_compare.py).
ENGINE_BY_DEVICE: dict[str, str] = {"cuda": "torch", "cpu": "llamacpp"}
# Sources only one engine can load.
ENGINE_BY_SOURCE: dict[str, str] = {"synthetic": "torch"}


@dataclass(frozen=True)
class Choice:
    engine: str     # "torch" | "llamacpp"
    reason: str     # for logs and `ebbtide models`: why this engine


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def torch_can_serve(info: ModelInfo) -> bool:
    return info.family in TORCH_FAMILIES


def choose_engine(info: ModelInfo, config: EngineConfig,
                  has_cuda: Callable[[], bool] = cuda_available) -> Choice:
    asked = config.engine_for(info.name)
    if asked != "auto":
        return Choice(asked, f"set for {info.name}" if info.name in config.engine_overrides
                      else "default_engine in settings")
    if info.source in ENGINE_BY_SOURCE:
        return Choice(ENGINE_BY_SOURCE[info.source], f"{info.source} models run only there")
    device = "cuda" if has_cuda() else "cpu"
    engine = ENGINE_BY_DEVICE[device]
    if engine == "torch" and not torch_can_serve(info):
        return Choice("llamacpp", f"the torch engine does not implement the {info.family!r} family")
    return Choice(engine, f"the default on {'a CUDA GPU' if device == 'cuda' else 'the CPU'}")
