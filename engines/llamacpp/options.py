"""The llama.cpp model and context parameters an engine is built with.

CPU by default; every layer on the GPU when this llama.cpp build can offload
(`llama_supports_gpu_offload()`, true for a CUDA build). Always
`use_extra_bufts = False`: llama-cpp-python 0.3.36 built from source segfaults
inside decode on CPUs with AMX unless the loader skips the extra (repacked)
weight buffer types. `Llama(...)` swallows an unknown `use_extra_bufts=` keyword
without effect, which is one reason this engine builds the native params
itself and loads through llama_cpp's thin wrappers (`_internals`), not `Llama`.
"""
from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass

import llama_cpp

from engines.base import ModelInfo
from engines.broker_client import load_estimate
from engines.config import EngineConfig
from engines.context import served_context

log = logging.getLogger(__name__)

ALL_LAYERS = 0x7FFFFFFF  # llama.cpp clamps to the model's layer count
# ctypes type of llama_model_params.progress_callback: bool (*)(float progress, void *user_data)
ProgressFn = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_float, ctypes.c_void_p)


def gpu_offload_supported() -> bool:
    """True when this llama.cpp build can put layers on a GPU (built with CUDA, Metal...)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass
class ModelParams:
    """The native params plus the ctypes callback they point to, kept alive together
    (a collected callback would be called after free: a crash in the loader)."""
    params: llama_cpp.llama_model_params
    on_gpu: bool
    _callback: object = None


def model_params(config: EngineConfig, progress: Callable[[float], None] | None = None) -> ModelParams:
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = False   # the AMX decode segfault (see the module docstring)
    on_gpu = gpu_offload_supported() and config.llama_n_gpu_layers != 0
    n_layers = config.llama_n_gpu_layers
    params.n_gpu_layers = (ALL_LAYERS if n_layers == -1 else n_layers) if on_gpu else 0
    callback = None
    if progress is not None:
        def on_progress(fraction: float, _user: object) -> bool:
            try:
                progress(float(fraction))
            except Exception:  # a broken listener must not abort the load
                log.exception("load progress listener failed")
            return True    # False would cancel the load
        callback = ProgressFn(on_progress)
        params.progress_callback = callback
    return ModelParams(params=params, on_gpu=on_gpu, _callback=callback)


def context_n_ctx(config: EngineConfig, info: ModelInfo) -> int:
    """The context length: the per-model override, else the configured one, else the trained
    length bounded as engines/context.py says; never more than the model was trained for."""
    wanted = config.context_overrides.get(info.name, config.llama_n_ctx)
    if wanted is None:
        wanted = served_context(info.context_length, config.max_context, load_estimate(info, 1) - info.size_bytes,
                                config.kv_budget_bytes)
    trained = info.context_length if info.context_length > 0 else wanted
    return max(16, min(wanted, trained))


def context_params(config: EngineConfig, n_ctx: int, embeddings: bool = False) -> llama_cpp.llama_context_params:
    params = llama_cpp.llama_context_default_params()
    threads = config.resolved_threads()
    params.n_ctx = n_ctx
    # n_batch is the tokens one step may carry (prompt chunks plus one token of every
    # running sequence); n_ubatch the tokens one compute graph takes. Equal, as
    # llama-cpp-python's Llama sets them: prompts read at llama.cpp's own speed.
    params.n_batch = min(config.llama_n_batch, n_ctx)
    params.n_ubatch = params.n_batch
    params.n_threads = threads
    params.n_threads_batch = threads
    # Generation: one sequence per slot over one shared (unified) KV pool, so any one
    # sequence may use the whole context and a prefix shared by two slots is one set of
    # cells (batcher.py). Embeddings: one sequence.
    params.n_seq_max = 1 if embeddings else config.llama_num_slots
    params.kv_unified = True
    params.no_perf = False            # keep llama.cpp's own timings (prompt/eval counts)
    params.embeddings = embeddings
    if embeddings:
        # Generative models have no pooling of their own; mean pooling is what
        # llama.cpp's server and Ollama use for them.
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    return params


def describe(config: EngineConfig, info: ModelInfo) -> dict[str, object]:
    """The options as plain values, for logs and the dashboard."""
    mp = model_params(config)
    return {"model": info.name, "use_extra_bufts": bool(mp.params.use_extra_bufts),
            "n_gpu_layers": int(mp.params.n_gpu_layers), "on_gpu": mp.on_gpu,
            "n_ctx": context_n_ctx(config, info), "n_batch": min(config.llama_n_batch, context_n_ctx(config, info)),
            "n_threads": config.resolved_threads(), "num_slots": config.llama_num_slots}
