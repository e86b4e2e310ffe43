"""Ollama dialect, generation side: /api/generate, /api/chat, /api/embed, /api/embeddings.

A thin adapter over engines.types. As Ollama: NDJSON streaming unless
"stream": false; an empty prompt/messages only loads the model (or unloads it
with keep_alive 0) and answers done_reason "load"/"unload"; durations are in
nanoseconds; an error after the stream started is one {"error": "..."} line.
The listing side (/api/tags, /api/show, /api/ps, /api/version) is in
ollama_info_routes.py.
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.server.context import ServerContext, ctx_of
from app.server.embedding_sizes import shorten
from app.server.errors import BadRequest, Dialect
from app.server.fields import FIELDS, Strict, warn_unapplied_options
from app.server.generation import Generation, start_generation
from app.server.messages import IMAGES_REFUSED, ChatMessageIn, to_messages
from app.server.ollama_format import now_rfc3339, parse_keep_alive
from app.server.sampling import make_sampling
from app.server.shaping import OutputShaper, make_shaper
from app.server.streaming import NDJSON_MEDIA, STREAM_HEADERS, guarded, ndjson
from app.server.structured import ToolPlan, check_think, ollama_format, tool_plan, with_generic_tools
from engines.errors import ContextOverflow
from engines.types import ChatMessage, FinishReason, GenerateRequest, RequestKind

router = APIRouter(prefix="/api", tags=["ollama"])

KeepAlive = str | float | None
DONE_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "stop", None: "stop"}


class Options(BaseModel):
    """Ollama's options. Ollama itself warns about keys it does not know and goes on; so do we,
    once per model, naming every key that is not applied (fields.OLLAMA_OPTIONS)."""
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

    def warn_unapplied(self, model: str) -> None:
        warn_unapplied_options(model, set(self.model_extra or {}))


def _table(endpoint: str) -> tuple[frozenset[str], dict[str, str]]:
    table = FIELDS[endpoint]
    return (frozenset(k for k, (st, _) in table.items() if st == "ignored"),
            {k: n for k, (st, n) in table.items() if st == "400"})


class _Common(Strict):
    model: str = Field(..., max_length=512)
    stream: bool | None = True
    options: Options | None = None
    keep_alive: KeepAlive = None
    format: str | dict | None = None
    think: bool | str | None = None
    truncate: bool | None = True
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def top_n(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else -1


class GenerateBody(_Common):
    IGNORED, REFUSED = _table("POST /api/generate")
    prompt: str | None = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool | None = False
    images: list[str] | None = None


class ChatBody(_Common):
    IGNORED, REFUSED = _table("POST /api/chat")
    messages: list[ChatMessageIn] | None = Field(default_factory=list, max_length=4096)
    tools: list[dict] | None = None


class EmbedBody(Strict):
    IGNORED, REFUSED = _table("POST /api/embed")
    model: str = Field(..., max_length=512)
    input: str | list[str] = ""
    truncate: bool | None = True
    keep_alive: KeepAlive = None
    options: Options | None = None
    dimensions: int | None = Field(None, ge=1)


class LegacyEmbeddingBody(Strict):
    model: str = Field(..., max_length=512)
    prompt: str = ""
    keep_alive: KeepAlive = None
    options: Options | None = None


def _sampling(options: Options | None):
    o = options or Options()
    return make_sampling(max_tokens=o.num_predict, temperature=o.temperature, top_p=o.top_p, top_k=o.top_k,
                         min_p=o.min_p, seed=o.seed, stop=o.stop, repeat_penalty=o.repeat_penalty,
                         repeat_last_n=o.repeat_last_n, presence_penalty=o.presence_penalty,
                         frequency_penalty=o.frequency_penalty)


def _request(body: _Common, info, kind: RequestKind, **fields) -> GenerateRequest:
    if body.options is not None:
        body.options.warn_unapplied(info.name)
    constraint = ollama_format(body.format)
    think = check_think(body.think, info, constraint is not None) if kind is RequestKind.CHAT else None
    return GenerateRequest(kind, _sampling(body.options), think=think, constraint=constraint,
                           top_logprobs=body.top_n(), num_ctx=body.options.num_ctx if body.options else None,
                           **fields)


def _generate_request(body: GenerateBody, info) -> GenerateRequest:
    if body.images:   # as the OpenAI route and /api/chat answer: no engine here sees images
        raise BadRequest(IMAGES_REFUSED)
    prompt = body.prompt or ""
    if body.suffix:
        return _request(body, info, RequestKind.INFILL, prompt=prompt, suffix=body.suffix)
    if body.raw:
        return _request(body, info, RequestKind.COMPLETION, prompt=prompt)
    messages = ((ChatMessage("system", body.system),) if body.system else ()) + (ChatMessage("user", prompt),)
    return _request(body, info, RequestKind.CHAT, messages=messages)


@router.post("/generate")
async def generate(body: GenerateBody, request: Request):
    ctx = ctx_of(request)
    keep_alive = parse_keep_alive(body.keep_alive)
    info = await ctx.manager.resolve(body.model)
    gen_request = _generate_request(body, info)  # validates options before any loading
    if not body.prompt and not body.suffix:
        return await _load_only(ctx, body.model, keep_alive, {"response": ""})
    shaper = make_shaper(info, ToolPlan(), gen_request.messages, gen_request.think) \
        if gen_request.kind is RequestKind.CHAT else OutputShaper(ToolPlan())
    gen = await start_generation(ctx.manager, ctx.metrics, info.name, gen_request, keep_alive)
    return await _respond(gen, body.stream is not False, shaper, _generate_piece, request)


@router.post("/chat")
async def chat(body: ChatBody, request: Request):
    ctx = ctx_of(request)
    keep_alive = parse_keep_alive(body.keep_alive)
    info = await ctx.manager.resolve(body.model)
    plan = tool_plan(body.tools, None, True)
    messages = with_generic_tools(to_messages(body.messages or []), plan, info)
    gen_request = _request(body, info, RequestKind.CHAT, messages=messages, tools=plan.tools)
    if not body.messages:
        return await _load_only(ctx, body.model, keep_alive, {"message": {"role": "assistant", "content": ""}})
    shaper = make_shaper(info, plan, messages, gen_request.think)
    gen = await _start_truncating(ctx, info.name, gen_request, keep_alive, body.truncate is not False)
    return await _respond(gen, body.stream is not False, shaper, _chat_piece, request)


async def _start_truncating(ctx: ServerContext, model: str, gen_request: GenerateRequest,
                            keep_alive: float | None, truncate: bool) -> Generation:
    """Ollama's truncate (the default): a conversation over the context loses its oldest turns
    (system messages and the last turn stay) until it fits; truncate false answers 400."""
    while True:
        try:
            return await start_generation(ctx.manager, ctx.metrics, model, gen_request, keep_alive)
        except ContextOverflow:
            messages = gen_request.messages
            droppable = [i for i, m in enumerate(messages[:-1]) if m.role != "system"]
            if not truncate or not droppable:
                raise
            gen_request = replace(gen_request, messages=messages[:droppable[0]] + messages[droppable[0] + 1:],
                                  cancelled=threading.Event())


def _chat_piece(thinking: str, content: str, calls: list) -> dict:
    message: dict = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    if calls:
        message["tool_calls"] = [{"function": {"index": i, "name": c.name, "arguments": c.arguments}}
                                 for i, c in enumerate(calls)]
    return {"message": message}


def _generate_piece(thinking: str, content: str, calls: list) -> dict:
    return {"response": content, **({"thinking": thinking} if thinking else {})}


def _logprobs_json(items) -> list[dict]:
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top]}
            for lp in items]


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


async def _respond(gen: Generation, stream: bool, shaper: OutputShaper, piece, client: Request):
    with_logprobs = gen.request.top_logprobs >= 0
    if not stream:
        totals = await gen.collect(client)
        shaper.feed(totals.text)
        shaper.finish()
        final = _final(gen, piece(shaper.thinking, shaper.content, shaper.calls))
        if with_logprobs:
            final["logprobs"] = _logprobs_json(gen.logprobs)
        return JSONResponse(final, headers=_keep_alive_headers(gen.lease))

    def line(thinking: str, content: str, calls: list, logprobs=()) -> bytes:
        out = {"model": gen.model, "created_at": now_rfc3339(), **piece(thinking, content, calls), "done": False}
        if with_logprobs and logprobs:
            out["logprobs"] = _logprobs_json(logprobs)
        return ndjson(out)

    async def lines():
        async for chunk in gen.chunks():
            part = shaper.feed(chunk.text)
            if part.thinking or part.content or (with_logprobs and chunk.logprobs):
                yield line(part.thinking, part.content, [], chunk.logprobs)
        rest = shaper.finish()
        if rest.thinking or rest.content or shaper.calls:
            yield line(rest.thinking, rest.content, shaper.calls)
        yield ndjson(_final(gen, piece("", "", [])))

    return StreamingResponse(guarded(lines(), gen.close, Dialect.OLLAMA), media_type=NDJSON_MEDIA,
                             headers={**STREAM_HEADERS, **_keep_alive_headers(gen.lease)})


async def _embed(ctx: ServerContext, model: str, texts: list[str], keep_alive: float | None, truncate: bool = False):
    started = time.perf_counter_ns()
    lease = await ctx.manager.lease(model, keep_alive)
    try:
        result = await to_thread.run_sync(lambda: lease.engine.embed(texts, truncate=truncate))
    finally:
        lease.release()
    return lease, result, time.perf_counter_ns() - started


@router.post("/embed")
async def embed(body: EmbedBody, request: Request) -> dict:
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if body.options is not None:
        body.options.warn_unapplied(body.model)
    lease, result, total_ns = await _embed(ctx_of(request), body.model, texts, parse_keep_alive(body.keep_alive),
                                           body.truncate is not False)
    return {"model": lease.loaded.name, "embeddings": [shorten(v, body.dimensions) for v in result.vectors],
            "total_duration": total_ns, "load_duration": lease.load_ns, "prompt_eval_count": result.prompt_tokens}


@router.post("/embeddings")
async def embeddings_legacy(body: LegacyEmbeddingBody, request: Request) -> dict:
    _, result, _ = await _embed(ctx_of(request), body.model, [body.prompt], parse_keep_alive(body.keep_alive))
    return {"embedding": list(result.vectors[0]) if result.vectors else []}
