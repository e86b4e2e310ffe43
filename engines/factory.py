"""create_engine(info, config): the engine for a model, chosen by engines.choice.

Engine classes are imported only when chosen, so serving a GGUF model on the
CPU never imports torch, and a machine without llama-cpp-python can still run
the torch engine. Extra keyword arguments go to the engine's constructor (the
torch engine takes the broker's page pool, for instance).

A model the routing table sends away from the device's own engine (a GGUF
with IQ weights on a GPU) is created with `engine.fallback_note` saying why.
`load_with_fallback` loads an engine and, where the torch engine fails on a
GGUF file for any reason, loads the llama.cpp engine on the same file instead:
a log line and `engine.fallback_note` (shown in /api/ps and `ebbtide ps`),
never an error the user sees for a model llama.cpp can serve.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from engines.base import Engine, ModelInfo, ProgressCallback
from engines.choice import choose_engine, cuda_available
from engines.config import EngineConfig
from engines.errors import ModelLoadError

log = logging.getLogger(__name__)

# engine kind -> "module:Class"
ENGINE_CLASSES: dict[str, str] = {
    "torch": "engines.torch.engine:TorchEngine",
    "llamacpp": "engines.llamacpp.engine:LlamaCppEngine",
}
# What to install when an engine's module is missing.
ENGINE_PACKAGES: dict[str, str] = {"torch": "torch", "llamacpp": "llama-cpp-python"}


def engine_class(kind: str) -> type[Engine]:
    module_name, _, class_name = ENGINE_CLASSES[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"the {kind} engine cannot be imported ({exc}); "
                             f"install {ENGINE_PACKAGES[kind]}") from exc
    return getattr(module, class_name)


def create_engine(info: ModelInfo, config: EngineConfig | None = None,
                  has_cuda: Callable[[], bool] = cuda_available, **engine_kwargs: object) -> Engine:
    """An unloaded engine for info; call load() on it (the app does, with progress)."""
    config = config or EngineConfig()
    choice = choose_engine(info, config, has_cuda)
    if not choice.is_detour:
        log.info("%s: %s engine (%s)", info.name, choice.engine, choice.reason)
        return engine_class(choice.engine)(info, config, **engine_kwargs)
    # Not the device's own engine: a warning, and the reason where the user reads it (/api/ps).
    note = f"{choice.reason}; served by {choice.engine}"
    log.warning("%s: %s", info.name, note)
    engine = engine_class(choice.engine)(info, config, **engine_kwargs)
    engine.fallback_note = note
    return engine


def load_with_fallback(engine: Engine, progress: ProgressCallback | None = None) -> Engine:
    """engine.load(progress); a torch engine that fails on a GGUF file hands it to llama.cpp."""
    try:
        engine.load(progress=progress)
        return engine
    except Exception as exc:
        info = engine.info
        if engine.kind != "torch" or not info.path.endswith(".gguf"):
            raise
        note = f"the torch engine failed to load it ({type(exc).__name__}: {exc}); served by llama.cpp"
        log.warning("%s: %s", info.name, note, exc_info=not isinstance(exc, ModelLoadError))
    fallback = engine_class("llamacpp")(info, getattr(engine, "config", None) or EngineConfig())
    fallback.load(progress=progress)
    fallback.fallback_note = note
    return fallback
