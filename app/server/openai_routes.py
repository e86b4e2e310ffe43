"""OpenAI dialect: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

A thin adapter: JSON -> GenerateRequest, chunks -> OpenAI JSON. Streaming is
SSE ending in `data: [DONE]`; with stream_options.include_usage every chunk
carries "usage": null and one last chunk with empty choices carries the usage,
as OpenAI does. `suffix` on /v1/completions is fill-in-the-middle.
"""
from __future__ import annotations

import array
import base64
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.server.context import ctx_of
from app.server.errors import BadRequest, Dialect
from app.server.generation import Generation, check_token_ids, start_generation
from app.server.generation import detokenize as detokenize_ids
from app.server.messages import ChatMessageIn, to_messages
from app.server.sampling import FINISH_NAMES, make_sampling
from app.server.streaming import SSE_MEDIA, STREAM_HEADERS, guarded, sse
from engines.types import GenerateRequest, RequestKind

router = APIRouter(prefix="/v1", tags=["openai"])

StopField = str | list[str] | None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field("", max_length=512)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopField = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None


class ChatCompletionBody(_Common):
    messages: list[ChatMessageIn] = Field(..., min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for legacy completions
    echo: bool | None = False


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field("", max_length=512)
    input: str | list[str] | list[int] | list[list[int]]
    # The openai library asks for base64 (little-endian float32) by default: it is smaller.
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)


def _sampling(body: _Common, max_tokens: int | None):
    return make_sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                         stop=body.stop, presence_penalty=body.presence_penalty,
                         frequency_penalty=body.frequency_penalty)


def _usage_json(gen: Generation) -> dict:
    usage = gen.usage()
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


@router.get("/models")
async def list_models(request: Request) -> dict:
    ctx = ctx_of(request)
    models = ctx.manager.registry.list()
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": int(m.modified_at), "owned_by": m.source} for m in models]}


@router.get("/models/{model:path}")
async def get_model(model: str, request: Request) -> dict:
    info = await ctx_of(request).manager.resolve(model)
    return {"id": info.name, "object": "model", "created": int(info.modified_at), "owned_by": info.source}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionBody, request: Request):
    ctx = ctx_of(request)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    gen_request = GenerateRequest(RequestKind.CHAT, _sampling(body, max_tokens), messages=to_messages(body.messages))
    gen = await start_generation(ctx.manager, ctx.metrics, body.model, gen_request)
    return await _respond(gen, body, "chat.completion", _chat_choice, _chat_delta, request)


@router.post("/completions")
async def completions(body: CompletionBody, request: Request):
    ctx = ctx_of(request)
    prompt = await _prompt_text(body.prompt, body.model, request)
    kind = RequestKind.INFILL if body.suffix is not None else RequestKind.COMPLETION
    gen_request = GenerateRequest(kind, _sampling(body, body.max_tokens), prompt=prompt, suffix=body.suffix or "")
    gen = await start_generation(ctx.manager, ctx.metrics, body.model, gen_request)
    echo = prompt if body.echo else ""
    return await _respond(gen, body, "text_completion", lambda g: _text_choice(g, echo), _text_delta, request)


async def _prompt_text(prompt, model: str, request: Request) -> str:
    """OpenAI allows a string, a list of one string, or token ids; we serve one prompt per request."""
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        return ""
    if len(prompt) > 1 and not isinstance(prompt[0], int):
        raise BadRequest("prompt: one prompt per request is supported (n=1), got a list of several")
    first = prompt[0] if not isinstance(prompt[0], int) else prompt
    if isinstance(first, str):
        return first
    return await detokenize_ids(ctx_of(request).manager, model, list(first))


def _chat_choice(gen: Generation) -> dict:
    return {"index": 0, "message": {"role": "assistant", "content": gen.totals.text},
            "logprobs": None, "finish_reason": FINISH_NAMES[gen.totals.finish_reason]}


def _text_choice(gen: Generation, echo: str) -> dict:
    return {"index": 0, "text": echo + gen.totals.text, "logprobs": None,
            "finish_reason": FINISH_NAMES[gen.totals.finish_reason]}


def _chat_delta(text: str, first: bool, finish) -> dict:
    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
    return {"index": 0, "delta": delta, "logprobs": None,
            "finish_reason": FINISH_NAMES[finish] if finish is not None else None}


def _text_delta(text: str, first: bool, finish) -> dict:
    return {"index": 0, "text": text, "logprobs": None,
            "finish_reason": FINISH_NAMES[finish] if finish is not None else None}


async def _respond(gen: Generation, body: _Common, obj: str, choice, delta, client: Request):
    ident = ("chatcmpl-" if obj == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if not body.stream:
        await gen.collect(client)
        return JSONResponse({"id": ident, "object": obj, "created": created, "model": gen.model,
                             "system_fingerprint": "ebbtide", "choices": [choice(gen)], "usage": _usage_json(gen)})
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk_obj = obj + ".chunk" if obj == "chat.completion" else obj

    def frame(choices: list, usage: dict | None = None) -> bytes:
        payload = {"id": ident, "object": chunk_obj, "created": created, "model": gen.model,
                   "system_fingerprint": "ebbtide", "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return sse(payload)

    async def events():
        first = True
        async for chunk in gen.chunks():
            if chunk.text or first or chunk.finish_reason is not None:
                yield frame([delta(chunk.text, first, chunk.finish_reason)])
                first = False
        if include_usage:
            yield frame([], _usage_json(gen))
        yield sse("[DONE]")

    return StreamingResponse(guarded(events(), gen.close, Dialect.OPENAI), media_type=SSE_MEDIA, headers=STREAM_HEADERS)


@router.post("/embeddings")
async def embeddings(body: EmbeddingBody, request: Request) -> dict:
    ctx = ctx_of(request)
    lease = await ctx.manager.lease(body.model)
    try:
        texts = _embedding_texts(body.input, lease)
        result = await _run(lease.engine.embed, texts)
    finally:
        lease.release()
    encode = _base64_floats if body.encoding_format == "base64" else list
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)]
    return {"object": "list", "data": data, "model": lease.loaded.name,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}


def _base64_floats(vector) -> str:
    return base64.b64encode(array.array("f", vector).tobytes()).decode()


def _embedding_texts(value, lease) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise BadRequest("input: must not be empty")
    vocab = int(lease.loaded.info.metadata.get("vocab_size") or 0)
    token_lists = [value] if isinstance(value[0], int) else value if isinstance(value[0], list) else None
    if token_lists is None:
        return list(value)
    for ids in token_lists:
        check_token_ids(list(ids), vocab)
    return [lease.engine.detokenize(list(ids)) for ids in token_lists]


async def _run(fn, *args):
    from anyio import to_thread

    return await to_thread.run_sync(fn, *args)
