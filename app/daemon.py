"""The daemon, and the one composition root: `serve(settings) -> int` builds everything
from Settings and runs uvicorn on settings.host:settings.port until SIGTERM or SIGINT.

What is built here, once, and passed down (nothing below builds its own):
- the KvcachedConfig (kv_config), from Settings;
- kvcached: one VMM backend, which decides the device (kvcached.vmm.resolve_backend),
  one PagePool over it with the settings' budget, and the Broker over that pool
  (open_kv), so the broker's pool step, the budget and the backend reach every model;
- the EngineConfig (engine_config), and the engine factory that hands each torch
  engine that one pool (make_engine_factory);
- the registry, model manager, event hub, metrics and the HTTP app (build_context).

It starts fast: no model loads before the first request, and torch is imported
only when an engine that needs it is made. SIGTERM stops accepting, lets
requests in flight finish for a short grace period, cancels the rest (each
engine frees its sequences), unloads models and exits 0.

Run it as `ebbtide serve` (app/cli.py) or `python -m app.daemon` (tests).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from app import env, exit_codes
from app.diagnostics import install_stack_dump_signal
from app.models.broker_link import BrokerLink
from app.models.events import EventHub, event_kind
from app.models.manager import ModelManager
from app.paths import AppPaths, app_paths, runtime_dir_note
from app.port_check import port_problem
from app.server import auth
from app.server.app_factory import create_app
from app.server.context import ServerContext
from app.server.metrics import Metrics
from app.server.security import is_loopback_host
from app.settings import Settings
from engines import compile_cache
from engines.config import EngineConfig

log = logging.getLogger(__name__)

FINISH_S = 3  # seconds in-flight requests get to finish after SIGTERM before they are cancelled
GRACE_S = 6   # uvicorn's own limit, a backstop: by then every request has ended
EXIT_OK, EXIT_CONFIG, EXIT_BIND = exit_codes.OK, exit_codes.CONFIG, exit_codes.BIND


class _Server(uvicorn.Server):
    """uvicorn, but a SIGTERM/SIGINT shutdown is a clean exit (0), not a re-raised signal,
    and the endpoint URL is printed once the socket is bound."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext) -> None:
        super().__init__(config)
        self.ctx = ctx

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # we shut down on purpose: exit 0, do not re-raise
        self.ctx.hub.publish("shutdown", reason=signal.Signals(sig).name)  # ends event streams
        # Cancel what has not finished in FINISH_S ourselves: engines stop their sequences
        # and handlers end normally, instead of uvicorn cancelling tasks mid-await.
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(loop.call_later, FINISH_S, self.ctx.manager.cancel_all)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"Ebbtide is serving on {self.ctx.endpoint_url}", flush=True)
            print(f"  OpenAI: {self.ctx.endpoint_url}/v1   Ollama: {self.ctx.endpoint_url}   "
                  f"dashboard: {self.ctx.endpoint_url}/dashboard", flush=True)


def engine_config(settings: Settings, paths: AppPaths):
    """EngineConfig from the app's Settings (the one place the two are joined)."""
    from engines.config import config_from_settings

    return config_from_settings(settings, models_dir=str(paths.models_dir), kv_disk_dir=str(paths.kv_dir))


def kv_config(settings: Settings):
    """KvcachedConfig from the app's Settings: the only one the daemon makes."""
    from kvcached.config import KvcachedConfig

    return KvcachedConfig(backend=settings.backend, headroom_bytes=settings.headroom_bytes,
                          host_low_bytes=settings.host_low_bytes,
                          budget_bytes=settings.budget_bytes or None,
                          monitor_interval_s=settings.monitor_interval_s, auto_yield=settings.auto_yield)


@dataclass
class KvRuntime:
    """kvcached for the whole daemon: one backend (the device), one pool, the broker over it.
    pool is None where no backend opened; broker is None where it could not start."""
    pool: object | None = None
    broker: object | None = None
    monitor: str = "none"

    def on_cuda(self) -> bool:
        from engines.factory import pool_on_cuda

        return pool_on_cuda(self.pool)

    def close(self) -> None:
        """After the broker (BrokerLink.close) and every engine let go of their pages."""
        if self.pool is not None:
            self.pool.close()
            self.pool.backend.close()


def open_kv(settings: Settings, engines: EngineConfig) -> KvRuntime:
    """Open the backend, the pool and the broker; what fails is logged and left out
    (serving without memory brokering beats not serving). engines: what the models will
    run with (the kernel warm-up runs the same decode batches)."""
    from kvcached.vmm import open_backend
    from kvcached.page_pool import PagePool

    config = kv_config(settings)
    try:
        backend = open_backend(config)
        pool = PagePool(backend, config)
    except Exception as exc:
        log.warning("kvcached unavailable, serving with llama.cpp only: %s", exc)
        return KvRuntime()
    from engines.factory import prepare_device

    prepare_device(pool, engines)   # the libraries' and kernels' share of the context now, not on the first load
    try:
        from kvcached.broker import Broker

        broker = Broker(config, pool=pool).start()
        return KvRuntime(pool, broker, broker.monitor.name)
    except Exception as exc:
        log.warning("memory broker unavailable, serving without it: %s", exc)
        return KvRuntime(pool)


def make_engine_factory(config, runtime: Callable[[], KvRuntime]):
    """The manager's engine factory: every engine gets the daemon's one pool (waiting,
    on the loading thread, for it to open)."""
    def make_engine(info):
        from engines.factory import create_engine  # imports torch only when needed

        return create_engine(info, config, kv_pool=runtime().pool)

    return make_engine


def open_kv_in_background(settings: Settings, engines: EngineConfig,
                          link: BrokerLink) -> concurrent.futures.Future:
    """open_kv on a thread (it imports torch: seconds on a small CPU; /health must answer at
    once); the broker goes to the link when it is there. Returns the KvRuntime's future."""
    opened: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> tuple[object | None, str]:
        try:
            runtime = open_kv(settings, engines)
        except BaseException as exc:
            opened.set_exception(exc)
            raise
        opened.set_result(runtime)
        link.on_close(runtime.close)
        return runtime.broker, runtime.monitor

    link.open_in_background(run)
    return opened


def build_context(settings: Settings) -> ServerContext:
    from engines.registry import ModelRegistry

    paths = app_paths().ensure()
    compile_cache.use(paths.cache_dir)  # before any model compiles: kernels outlive the process
    token = auth.ensure_token(paths.token_file)
    hub = EventHub()
    link = BrokerLink(None, hub)
    config = engine_config(settings, paths)
    runtime = open_kv_in_background(settings, config, link)
    manager = ModelManager(ModelRegistry(config), make_engine_factory(config, runtime.result), settings, hub, link)
    metrics = Metrics(lambda: {l.name: _memory_gauges(l.engine) for l in manager.loaded()})
    hub.listen(lambda event: _count_reclaim(metrics, event))
    on_cuda = lambda: runtime.done() and not runtime.exception() and runtime.result().on_cuda()  # noqa: E731
    return ServerContext(settings, manager, metrics, hub, link, token, on_cuda)


def _count_reclaim(metrics: Metrics, event) -> None:
    """The broker's reclaim steps and manual reclaims become the /metrics reclaim counters
    (a model's state change only announces a step that is counted already)."""
    step = event_kind(event.kind, event.data)
    if step is None or not step.is_reclaim() or event.kind == "model":
        return
    data = event.data
    metrics.record_reclaim(step.value, str(data.get("client") or data.get("model", "")),
                           int(data.get("bytes_returned", 0)))


def _memory_gauges(engine) -> dict[str, int]:
    m = engine.memory()
    return {"weights": m.weights_bytes, "kv_held": m.kv_held_bytes, "kv_live": m.kv_live_bytes,
            "paused_host": m.paused_host_bytes, "prompt_cache_host": m.prompt_cache_host_bytes,
            "staging_host": m.staging_host_bytes}


def check_bind(settings: Settings) -> str | None:
    """Why this bind is refused, or None. Off loopback needs the explicit setting."""
    if is_loopback_host(settings.host) or settings.allow_non_loopback:
        return None
    return (f"refusing to bind {settings.host}: it is reachable from other machines. Set "
            f"allow_non_loopback = true in settings.toml to allow it (the bearer token is then "
            f"required on every route)")


def serve(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit code."""
    problem = check_bind(settings)
    if problem:
        print(f"ebbtide: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    paths = app_paths()
    busy = port_problem(settings.host, settings.port, settings.endpoint_url, paths.settings_file)
    if busy:
        print(f"ebbtide: {busy}", file=sys.stderr)
        return EXIT_BIND
    note = runtime_dir_note(paths)
    if note:
        log.info("%s", note)
    install_stack_dump_signal()   # kill -USR1 <pid>: every thread's stack into the log
    ctx = build_context(settings)
    config = uvicorn.Config(create_app(ctx), host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=GRACE_S, lifespan="on", access_log=False)
    server = _Server(config, ctx)
    server.run()
    if not server.started:
        print(f"ebbtide: could not listen on {settings.host}:{settings.port} (in use?)", file=sys.stderr)
        return EXIT_BIND
    log.info("stopped")
    return EXIT_OK


def main() -> int:
    from app.settings_file import load_settings

    logging.basicConfig(level=os.environ.get(env.LOG_LEVEL, "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(load_settings().settings)


if __name__ == "__main__":
    sys.exit(main())
