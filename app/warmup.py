"""`ebbtide warmup [MODEL]`: compile a model's kernels into the cache before the first request.

The torch engine's load compiles the decode step (torch.compile, Triton kernels);
with the compiled-kernel cache under Ebbtide's cache dir (engines/compile_cache.py)
that work is kept on disk, so a load here, once after install or after `pull`,
makes the daemon's first load of the model read compiled kernels instead of
compiling them. The load itself answers before anything is compiled (the engine
compiles while idle), so this waits for that too. CUDA graphs cannot be kept across
processes: the daemon captures its first one at load and the others while idle.

It loads the model in this process (beside a running daemon, that takes the
model's memory twice for the duration), then unloads it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from app.paths import AppPaths
from app.settings import Settings
from engines import compile_cache

log = logging.getLogger(__name__)
COMPILE_WAIT_S = 900.0   # an 8B model's first compile took ~56 s on the H100; slower GPUs, longer


def warm_up(model: str | None, settings: Settings, paths: AppPaths, progress) -> tuple[str, str, dict]:
    """(model name, engine kind, load phases in seconds) after loading and unloading it once."""
    from app.daemon import engine_config, kv_config
    from engines.factory import create_engine, load_with_fallback
    from engines.registry import ModelRegistry
    from kvcached.standalone import standalone_pool

    compile_cache.use(Path(paths.cache_dir))
    config = engine_config(settings, paths)
    registry = ModelRegistry(config)
    info = registry.get(model or "")     # "": the default model; ModelNotFound names near ones
    start = time.perf_counter()
    # The daemon's kvcached settings (so the daemon's device), in a pool of this process's own.
    with standalone_pool(kv_config(settings)) as pool:
        engine = load_with_fallback(create_engine(info, config, kv_pool=pool), progress=progress)
        try:
            # The load answers before it compiles (the torch engine compiles while idle, and
            # reports that as the phase capture_while_idle): the cache holds it once done.
            if not engine.finish_background_work(COMPILE_WAIT_S):
                log.warning("%s: still compiling after %.0f s; the cache holds what was done",
                            info.name, COMPILE_WAIT_S)
            return info.name, engine.kind, dict(engine.load_phases) or {"load": time.perf_counter() - start}
        finally:
            engine.unload()
