"""Ollama dialect, generation side: /api/generate, /api/chat, /api/embed, /api/embeddings.

A thin adapter over engines.types. As Ollama: NDJSON streaming unless
"stream": false; an empty prompt/messages only loads the model (or unloads it
with keep_alive 0) and answers done_reason "load"/"unload"; durations are in
nanoseconds; an error after the stream started is one {"error": "..."} line.
The listing side (/api/tags, /api/show, /api/ps, /api/version) is in
ollama_info_routes.py.
"""
from __future__ import annotations

import time

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.server.context import ServerContext, ctx_of
from app.server.errors import BadRequest, Dialect
from app.server.generation import Generation, start_generation
from app.server.messages import IMAGES_REFUSED, ChatMessageIn, to_messages
from app.server.ollama_format import now_rfc3339, parse_keep_alive
from app.server.sampling import make_sampling
from app.server.streaming import NDJSON_MEDIA, STREAM_HEADERS, guarded, ndjson
from engines.types import ChatMessage, FinishReason, GenerateRequest, RequestKind

router = APIRouter(prefix="/api", tags=["ollama"])

KeepAlive = str | float | None
DONE_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "stop", None: "stop"}


class Options(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    num_ctx: int | None = Field(None, ge=1)
    num_predict: int | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(None, ge=0)
    repeat_last_n: int | None = Field(None, ge=-1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(..., max_length=512)
    stream: bool | None = True
    options: Options | None = None
    keep_alive: KeepAlive = None
    format: str | dict | None = None


class GenerateBody(_Common):
    prompt: str | None = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool | None = False
    images: list[str] | None = None


class ChatBody(_Common):
    messages: list[ChatMessageIn] | None = Field(default_factory=list, max_length=4096)


class EmbedBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(..., max_length=512)
    input: str | list[str] = ""
    truncate: bool | None = True
    keep_alive: KeepAlive = None
    options: Options | None = None


class LegacyEmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(..., max_length=512)
    prompt: str = ""
    keep_alive: KeepAlive = None


def _sampling(options: Options | None):
    o = options or Options()
    return make_sampling(max_tokens=o.num_predict, temperature=o.temperature, top_p=o.top_p, top_k=o.top_k,
                         min_p=o.min_p, seed=o.seed, stop=o.stop, repeat_penalty=o.repeat_penalty,
                         repeat_last_n=o.repeat_last_n, presence_penalty=o.presence_penalty,
                         frequency_penalty=o.frequency_penalty)


def _generate_request(body: GenerateBody) -> GenerateRequest:
    if body.images:   # as the OpenAI route and /api/chat answer: no engine here sees images
        raise BadRequest(IMAGES_REFUSED)
    sampling = _sampling(body.options)
    prompt = body.prompt or ""
    if body.suffix:
        return GenerateRequest(RequestKind.INFILL, sampling, prompt=prompt, suffix=body.suffix)
    if body.raw:
        return GenerateRequest(RequestKind.COMPLETION, sampling, prompt=prompt)
    messages = ((ChatMessage("system", body.system),) if body.system else ()) + (ChatMessage("user", prompt),)
    return GenerateRequest(RequestKind.CHAT, sampling, messages=messages)


@router.post("/generate")
async def generate(body: GenerateBody, request: Request):
    ctx = ctx_of(request)
    keep_alive = parse_keep_alive(body.keep_alive)
    gen_request = _generate_request(body)  # validates options before any loading
    if not body.prompt and not body.suffix:
        return await _load_only(ctx, body.model, keep_alive, {"response": ""})
    gen = await start_generation(ctx.manager, ctx.metrics, body.model, gen_request, keep_alive)
    return await _respond(gen, body.stream is not False, lambda text: {"response": text}, request)


@router.post("/chat")
async def chat(body: ChatBody, request: Request):
    ctx = ctx_of(request)
    keep_alive = parse_keep_alive(body.keep_alive)
    sampling = _sampling(body.options)
    messages = to_messages(body.messages or [])
    if not messages:
        return await _load_only(ctx, body.model, keep_alive, {"message": {"role": "assistant", "content": ""}})
    gen_request = GenerateRequest(RequestKind.CHAT, sampling, messages=messages)
    gen = await start_generation(ctx.manager, ctx.metrics, body.model, gen_request, keep_alive)
    return await _respond(gen, body.stream is not False,
                          lambda text: {"message": {"role": "assistant", "content": text}}, request)


async def _load_only(ctx: ServerContext, model: str, keep_alive: float | None, empty: dict) -> JSONResponse:
    """Ollama's "empty request loads the model"; with keep_alive 0 it unloads instead."""
    if keep_alive == 0:
        info = await ctx.manager.resolve(model)
        await ctx.manager.expire(info.name)
        return JSONResponse({"model": info.name, "created_at": now_rfc3339(), **empty,
                             "done": True, "done_reason": "unload"})
    lease = await ctx.manager.lease(model, keep_alive)
    lease.release()
    return JSONResponse({"model": lease.loaded.name, "created_at": now_rfc3339(), **empty,
                         "done": True, "done_reason": "load", "load_duration": lease.load_ns},
                        headers=_keep_alive_headers(lease))


def _final(gen: Generation, piece: dict) -> dict:
    usage = gen.usage()
    total_ns = time.perf_counter_ns() - gen.started_ns
    return {"model": gen.model, "created_at": now_rfc3339(), **piece, "done": True,
            "done_reason": DONE_REASONS[gen.totals.finish_reason], "total_duration": total_ns + gen.load_ns,
            "load_duration": gen.load_ns, "prompt_eval_count": usage.prompt_tokens,
            "prompt_eval_duration": usage.prompt_eval_ns, "eval_count": usage.completion_tokens,
            "eval_duration": usage.eval_ns}


KEEP_ALIVE_HEADER = "X-Ebbtide-Keep-Alive"


def _keep_alive_headers(lease) -> dict[str, str]:
    """Says so when the client's keep_alive was cut to the keep_alive setting."""
    return {KEEP_ALIVE_HEADER: lease.keep_alive_cut} if lease.keep_alive_cut else {}


async def _respond(gen: Generation, stream: bool, piece, client: Request):
    if not stream:
        totals = await gen.collect(client)
        return JSONResponse(_final(gen, piece(totals.text)), headers=_keep_alive_headers(gen.lease))

    async def lines():
        async for chunk in gen.chunks():
            if chunk.text:
                yield ndjson({"model": gen.model, "created_at": now_rfc3339(), **piece(chunk.text), "done": False})
        yield ndjson(_final(gen, piece("")))

    return StreamingResponse(guarded(lines(), gen.close, Dialect.OLLAMA), media_type=NDJSON_MEDIA,
                             headers={**STREAM_HEADERS, **_keep_alive_headers(gen.lease)})


async def _embed(ctx: ServerContext, model: str, texts: list[str], keep_alive: float | None):
    started = time.perf_counter_ns()
    lease = await ctx.manager.lease(model, keep_alive)
    try:
        result = await to_thread.run_sync(lease.engine.embed, texts)
    finally:
        lease.release()
    return lease, result, time.perf_counter_ns() - started


@router.post("/embed")
async def embed(body: EmbedBody, request: Request) -> dict:
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    lease, result, total_ns = await _embed(ctx_of(request), body.model, texts, parse_keep_alive(body.keep_alive))
    return {"model": lease.loaded.name, "embeddings": [list(v) for v in result.vectors],
            "total_duration": total_ns, "load_duration": lease.load_ns, "prompt_eval_count": result.prompt_tokens}


@router.post("/embeddings")
async def embeddings_legacy(body: LegacyEmbeddingBody, request: Request) -> dict:
    _, result, _ = await _embed(ctx_of(request), body.model, [body.prompt], parse_keep_alive(body.keep_alive))
    return {"embedding": list(result.vectors[0]) if result.vectors else []}
