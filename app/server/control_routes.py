"""The control API for the tray, the CLI and the dashboard, under /control (bearer token).

Models and their states, memory (device and per model), the per-model verbs
(pause, resume, reclaim, unload), "give everything back now", auto-yield, the
daemon's status, and GET /control/events: a server-sent stream of model state
changes, load progress and broker reclaim steps. How the token is presented is
described in app/server/auth.py.
"""
from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from app.server import auth
from app.server.context import VERSION, ServerContext, ctx_of
from app.server.errors import Unauthorized
from app.server.streaming import SSE_MEDIA, STREAM_HEADERS, sse_event
from engines.types import ModelState

HEARTBEAT_S = 15.0


def require_token(request: Request) -> None:
    presented = auth.presented_token({k.lower(): v for k, v in request.headers.items()}, dict(request.cookies))
    if not auth.token_matches(ctx_of(request).token, presented):
        raise Unauthorized("the control API needs the token from the runtime dir "
                           "(Authorization: Bearer <token>)")


router = APIRouter(prefix="/control", tags=["control"], dependencies=[Depends(require_token)])


class AutoYieldBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    enabled: bool


def _memory_json(report) -> dict:
    return {"weights": report.weights_bytes, "kv_held": report.kv_held_bytes, "kv_live": report.kv_live_bytes,
            "paused_host": report.paused_host_bytes, "prompt_cache_host": report.prompt_cache_host_bytes,
            "weights_host": report.weights_host_bytes, "paused_disk": report.paused_disk_bytes,
            "staging_host": report.staging_host_bytes,
            "total": report.total_bytes, "on_gpu": report.on_gpu}


def _route(ctx: ServerContext, info) -> dict:
    """The engine that would serve it, and why (engines.choice's routing table)."""
    from engines.choice import choose_engine

    choice = choose_engine(info, ctx.manager.registry.config, ctx.on_cuda())
    return {"engine": choice.engine, "reason": choice.reason}


def model_rows(ctx: ServerContext) -> list[dict]:
    rows = {}
    for info in ctx.manager.registry.list():
        rows[info.name] = {"name": info.name, "state": ModelState.UNLOADED.value, "rung": ModelState.UNLOADED.value,
                           "busy": False, "engine": None,
                           "memory": None, "priority": ctx.settings.model(info.name).priority,
                           "size": info.size_bytes, "source": info.source, "context_length": info.context_length,
                           "remote": info.metadata.get("remote"),
                           "can_infill": info.can_infill, "expires_at": None, "route": _route(ctx, info)}
    for loaded in ctx.manager.loaded():
        engine, report, state = loaded.engine, loaded.engine.memory(), loaded.engine.state
        rows[loaded.name] = {**rows.get(loaded.name, {"name": loaded.name}), "state": state.value,
                             "rung": report.rung(state),
                             "busy": engine.busy, "engine": engine.kind, "memory": _memory_json(report),
                             **({"route": {"engine": engine.kind, "reason": engine.fallback_note}}
                                if engine.fallback_note else {}),
                             "priority": ctx.settings.model(loaded.name).priority,
                             "expires_at": None if loaded.expires_at == float("inf") else loaded.expires_at,
                             "requests_active": loaded.active, "load_phases_s": dict(engine.load_phases)}
    return list(rows.values())


# Reading an engine's memory can wait on its KV cache's lock, which a pause or resume
# holds while it copies gigabytes between device and host: these readers run in the
# thread pool, so the event loop (and every token stream on it) never waits with them.
@router.get("/models")
async def models(request: Request) -> dict:
    return {"models": await run_in_threadpool(model_rows, ctx_of(request))}


@router.get("/memory")
async def memory(request: Request) -> dict:
    return await run_in_threadpool(memory_report, ctx_of(request))


def memory_report(ctx: ServerContext) -> dict:
    per_model = {l.name: _memory_json(l.engine.memory()) for l in ctx.manager.loaded()}
    snapshot = ctx.broker.snapshot()
    device = (snapshot or {}).get("device") or _host_sample(sum(m["total"] for m in per_model.values()))
    # How old the device figures are: a stopped monitor shows here (the watchdog restarts
    # it); 0 where they were read just now (no broker).
    age = (snapshot or {}).get("sample_age_s", 0.0)
    return {"backend": ctx.backend, "device": device, "sample_age_s": age, "models": per_model,
            "auto_yield": (snapshot or {}).get("auto_yield", ctx.settings.auto_yield),
            "headroom_bytes": (snapshot or {}).get("headroom_bytes", ctx.settings.headroom_bytes),
            "broker": snapshot}


def _host_sample(ours: int) -> dict:
    """Without a broker, the host's memory from /proc/meminfo (what the host monitor reads)."""
    fields = {}
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
    except OSError:
        return {"total_bytes": 0, "free_bytes": 0, "ours_bytes": ours, "others_bytes": 0}
    total, free = fields.get("MemTotal", 0), fields.get("MemAvailable", 0)
    return {"total_bytes": total, "free_bytes": free, "ours_bytes": ours,
            "others_bytes": max(0, total - free - ours)}


async def _verb(request: Request, name: str, verb: str) -> dict:
    manager = ctx_of(request).manager
    verbs = {"pause": manager.pause, "weights_to_host": manager.weights_to_host, "resume": manager.resume,
             "reclaim": manager.reclaim, "unload": manager.unload}
    info = await manager.resolve(name)
    freed = await verbs[verb](info.name)
    return {"model": info.name, "action": verb, "bytes_returned": int(freed or 0),
            "state": (manager.find_loaded(info.name).engine.state.value
                      if manager.find_loaded(info.name) else ModelState.UNLOADED.value)}


@router.post("/models/{name:path}/pause")
async def pause(name: str, request: Request) -> dict:
    return await _verb(request, name, "pause")


@router.post("/models/{name:path}/weights_to_host")
async def weights_to_host(name: str, request: Request) -> dict:
    """"Free all GPU memory, keep ready": KV and weights to host memory, back at copy speed."""
    return await _verb(request, name, "weights_to_host")


@router.post("/models/{name:path}/resume")
async def resume(name: str, request: Request) -> dict:
    return await _verb(request, name, "resume")


@router.post("/models/{name:path}/reclaim")
async def reclaim_model(name: str, request: Request) -> dict:
    return await _verb(request, name, "reclaim")


@router.post("/models/{name:path}/unload")
async def unload(name: str, request: Request) -> dict:
    return await _verb(request, name, "unload")


@router.post("/reclaim")
async def reclaim_all(request: Request) -> dict:
    freed = await ctx_of(request).manager.reclaim_all()
    return {"action": "reclaim", "bytes_returned": int(freed or 0)}


@router.post("/auto-yield")
async def auto_yield(body: AutoYieldBody, request: Request) -> dict:
    ctx = ctx_of(request)
    ctx.broker.set_auto_yield(body.enabled)
    ctx.hub.publish("settings", auto_yield=body.enabled)
    return {"auto_yield": body.enabled}


@router.get("/status")
async def status(request: Request) -> dict:
    ctx = ctx_of(request)
    return {"version": VERSION, "endpoint": ctx.endpoint_url, "pid": os.getpid(), "backend": ctx.backend,
            "started_at": ctx.started_at, "broker": ctx.broker.enabled,
            "models_loaded": [l.name for l in ctx.manager.loaded()]}


@router.get("/events")
async def events(request: Request, since: int = Query(0, ge=0)) -> StreamingResponse:
    """Replays events after `since` (or the Last-Event-ID a reconnecting EventSource sends)
    still in the hub's history, then follows new ones."""
    last_id = request.headers.get("last-event-id", "")
    since = max(since, int(last_id)) if last_id.isdigit() else since
    hub = ctx_of(request).hub
    sub = hub.subscribe()  # before reading history, so nothing falls between the two
    backlog = [e for e in hub.recent() if e.seq > since]

    async def stream():
        try:
            yield b": ebbtide events\n\n"
            last = 0
            for event in backlog:
                last = event.seq
                yield sse_event(event.kind, event.to_dict(), event.seq)
            while True:
                try:
                    event = await asyncio.wait_for(sub.queue.get(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield b": keep-alive\n\n"  # lets clients (and proxies) see the stream is alive
                    continue
                if event.seq > last:
                    yield sse_event(event.kind, event.to_dict(), event.seq)
                if event.kind == "shutdown":
                    return  # the daemon is stopping: end the stream so shutdown need not wait
        finally:
            hub.unsubscribe(sub)

    return StreamingResponse(stream(), media_type=SSE_MEDIA, headers=STREAM_HEADERS)
