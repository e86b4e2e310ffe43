"""create_engine(info, config): the engine for a model, chosen by engines.choice.

Engine classes are imported only when chosen, so serving a GGUF model on the
CPU never imports torch, and a machine without llama-cpp-python can still run
the torch engine. The torch engine takes its KV pages from `kv_pool`, the
daemon's one kvcached PagePool (tests and benchmarks: kvcached.standalone);
the pool's backend is the device decision, made once where the pool was
opened, and the choice of engine follows it.

A model the routing table sends away from the device's own engine (a GGUF
with IQ weights on a GPU) is created with `engine.fallback_note` saying why.
`load_with_fallback` loads an engine and, where the torch engine fails on a
GGUF file for any reason, loads the llama.cpp engine on the same file instead:
a log line and `engine.fallback_note` (shown in /api/ps and `ebbtide ps`),
never an error the user sees for a model llama.cpp can serve.
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable
import logging

from engines.base import Engine, ModelInfo, ProgressCallback
from engines.choice import Choice, choose_engine
from engines.config import EngineConfig
from engines.errors import ModelLoadError
from kvcached.errors import TemporaryError

log = logging.getLogger(__name__)

# engine kind -> "module:Class"
ENGINE_CLASSES: dict[str, str] = {
    "torch": "engines.torch.engine:TorchEngine",
    "llamacpp": "engines.llamacpp.engine:LlamaCppEngine",
    "remote": "engines.remote.engine:RemoteEngine",
}
# What to install when an engine's module is missing.
ENGINE_PACKAGES: dict[str, str] = {"torch": "torch", "llamacpp": "llama-cpp-python", "remote": "httpx"}


def engine_class(kind: str) -> type[Engine]:
    module_name, _, class_name = ENGINE_CLASSES[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"the {kind} engine cannot be imported ({exc}); "
                             f"install {ENGINE_PACKAGES[kind]}") from exc
    return getattr(module, class_name)


def pool_on_cuda(kv_pool: object | None) -> bool:
    """Whether the models run on a CUDA GPU: the pool's backend decided it (kvcached.vmm)."""
    return kv_pool is not None and kv_pool.backend.name == "cuda"


def prepare_device(kv_pool: object | None, config: EngineConfig | None = None) -> None:
    """Once, when the daemon opens the GPU: the CUDA libraries every torch model uses set
    up (engines/torch/cuda_libraries.py), then the code of the engine's kernels loaded by a
    tiny model's round trip (engines/torch/kernel_warm_up.py): the process's fixed cost,
    paid before the first load, so every unload returns to it; config: the engines'
    settings (the warm-up decodes the same batch sizes). A failure is logged: the first
    load pays it then."""
    if not pool_on_cuda(kv_pool):
        return
    try:
        import torch

        from engines.torch.cuda_libraries import warm_up_libraries
        from engines.torch.kernel_warm_up import import_compiler, warm_up_engine_kernels
        config = config or EngineConfig()
        device = torch.device("cuda", torch.cuda.current_device())
        free_before, started = torch.cuda.mem_get_info(device)[0], time.monotonic()
        warm_up_libraries(device)
        warm_up_engine_kernels(kv_pool, config)
        if config.torch_compile:
            log.info("torch.compile's machinery imported in %.1f s", import_compiler())
        seconds = time.monotonic() - started
        loaded_mib = (free_before - torch.cuda.mem_get_info(device)[0]) / (1 << 20)
        log.info("CUDA libraries and kernel code loaded in %.1f s: %.0f MiB of the device (kept for "
                 "the process; every unload returns to this level)", seconds, loaded_mib)
    except Exception as exc:  # noqa: BLE001 - serving goes on; the first load pays it
        log.warning("setting up the CUDA libraries and kernels failed (the first load will): %s", exc)


def create_engine(info: ModelInfo, config: EngineConfig | None = None, kv_pool: object | None = None) -> Engine:
    """An unloaded engine for info; call load() on it (the app does, with progress).
    kv_pool: the kvcached PagePool torch engines take their KV pages from; without
    one the machine counts as CPU-only and a torch engine cannot be made."""
    config = config or EngineConfig()
    return engine_for(info, config, choose_engine(info, config, pool_on_cuda(kv_pool)), kv_pool)


def engine_for(info: ModelInfo, config: EngineConfig, choice: Choice, kv_pool: object | None = None) -> Engine:
    """The unloaded engine a routing choice names. A detour (the device's own engine
    cannot serve the model) is a warning and the reason in `fallback_note` (/api/ps)."""
    note = f"{choice.reason}; served by {choice.engine}" if choice.is_detour else ""
    if note:
        log.warning("%s: %s", info.name, note)
    else:
        log.info("%s: %s engine (%s)", info.name, choice.engine, choice.reason)
    if choice.engine != "torch":
        engine = engine_class(choice.engine)(info, config)
        engine.fallback_note = note
        return engine
    if kv_pool is None:
        raise ModelLoadError(f"{info.name}: the torch engine needs kvcached's page pool, "
                             f"which is not open (see the log for why)")
    return engine_class("torch")(info, config, kv_pool)


def load_with_fallback(engine: Engine, progress: ProgressCallback | None = None,
                       load: Callable[[Engine, ProgressCallback | None], None] | None = None) -> Engine:
    """load(engine, progress) (engine.load by default; the daemon's admits it through the
    broker first); a torch engine that fails on a GGUF file hands it to llama.cpp, whose
    load goes through `load` too (a model too large as torch floats may fit as blocks)."""
    load = load or (lambda e, p: e.load(progress=p))
    try:
        load(engine, progress)
        return engine
    except Exception as exc:
        info = engine.info
        # Out of memory now (another application holds it) is no reason to hand the
        # model to another engine for good: the caller retries the same one later.
        if engine.kind != "torch" or not info.path.endswith(".gguf") or isinstance(exc, TemporaryError):
            raise
        note = f"the torch engine failed to load it ({type(exc).__name__}: {exc}); served by llama.cpp"
        log.warning("%s: %s", info.name, note, exc_info=not isinstance(exc, ModelLoadError))
    fallback = engine_class("llamacpp")(info, getattr(engine, "config", None) or EngineConfig())
    load(fallback, progress)
    fallback.fallback_note = note
    return fallback
