"""Ollama dialect, model store side: /api/pull (streamed progress), /api/copy, /api/delete.

/api/pull fetches hf.co/OWNER/REPO[:QUANT] (or OWNER/REPO) into the Hugging Face
cache (app/pull/hub.py) and streams Ollama's status lines, which the `ollama`
library reads as ProgressResponse; "stream": false answers once at the end.
Checks that fail before a byte moves (a bad name, no such repo or quant, a full
disk) are HTTP errors; later failures are one {"error": ...} line. A client that
hangs up cancels the pull. /api/copy and /api/delete act on Ebbtide's own models
folder only (app/pull/own_folder.py).
"""
from __future__ import annotations

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.models.pulls import PullJob
from app.pull.hub import PullConfig
from app.pull.names import parse_pull_name
from app.pull.own_folder import copy_model, delete_model
from app.server.context import ctx_of
from app.server.errors import Dialect
from app.server.streaming import NDJSON_MEDIA, STREAM_HEADERS, guarded, ndjson

router = APIRouter(prefix="/api", tags=["ollama"])


class _Named(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=512)
    name: str | None = Field(None, max_length=512)  # what older clients send

    @model_validator(mode="after")
    def _one_name(self) -> "_Named":
        if not (self.model or self.name):
            raise ValueError("model: a model name is required")
        return self

    @property
    def wanted(self) -> str:
        return self.model or self.name or ""


class PullBody(_Named):
    insecure: bool | None = False   # meaningless for HTTPS to the hub; accepted as Ollama does
    stream: bool | None = True


class CopyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(..., max_length=512)
    destination: str = Field(..., max_length=512)


@router.post("/pull")
async def pull(body: PullBody, request: Request) -> Response:
    ctx = ctx_of(request)
    ref = parse_pull_name(body.wanted)
    registry = ctx.manager.registry
    job = PullJob(ref, PullConfig(registry.config.resolved_hf_cache_dir()), ctx.hub, registry)
    try:
        first = await job.next()  # raises the up-front failures as HTTP errors
    except BaseException:
        job.cancel()
        raise
    if body.stream is False:
        try:
            while await job.next() is not None:
                pass
        finally:
            job.cancel()  # no-op once done; stops the download if this handler was cancelled
        return Response(ndjson({"status": "success"}), media_type="application/json")

    async def frames():
        step = first
        while step is not None:
            yield ndjson(step.to_json())
            step = await job.next()

    return StreamingResponse(guarded(frames(), job.cancel, Dialect.OLLAMA), media_type=NDJSON_MEDIA,
                             headers=STREAM_HEADERS)


@router.post("/copy")
async def copy(body: CopyBody, request: Request) -> Response:
    registry = ctx_of(request).manager.registry
    await to_thread.run_sync(copy_model, registry, body.source, body.destination)
    return Response(status_code=200)


@router.delete("/delete")
async def delete(body: _Named, request: Request) -> Response:
    ctx = ctx_of(request)
    info = await ctx.manager.resolve(body.wanted)
    await to_thread.run_sync(delete_model, ctx.manager.registry, info.name)  # NotOurs before any unload
    if ctx.manager.find_loaded(info.name) is not None:
        await ctx.manager.unload(info.name)
    return Response(status_code=200)
