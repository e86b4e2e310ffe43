"""OpenAI dialect: /v1/models, /v1/completions, /v1/embeddings (chat: openai_chat.py).

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
from typing import ClassVar, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from app.server.context import ctx_of
from app.server.embedding_sizes import shorten
from app.server.errors import BadRequest, Dialect
from app.server.fields import FIELDS, Strict
from app.server.generation import Generation, check_token_ids, start_generation
from app.server.generation import detokenize as detokenize_ids
from app.server.model_context import served_context_of, served_ctx_of
from app.server.openai_common import OpenAICommon, legacy_logprobs_json, sampling_of, usage_json
from app.server.sampling import FINISH_NAMES
from app.server.streaming import SSE_MEDIA, STREAM_HEADERS, guarded, sse
from app.server.structured import capabilities
from engines.types import GenerateRequest, RequestKind

router = APIRouter(prefix="/v1", tags=["openai"])
_COMPLETIONS = FIELDS["POST /v1/completions"]
_EMBEDDINGS = FIELDS["POST /v1/embeddings"]


class CompletionBody(OpenAICommon):
    IGNORED: ClassVar[frozenset[str]] = frozenset(k for k, (s, _) in _COMPLETIONS.items() if s == "ignored")
    REFUSED: ClassVar[dict[str, str]] = {k: n for k, (s, n) in _COMPLETIONS.items() if s == "400"}
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for legacy completions
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingBody(Strict):
    IGNORED: ClassVar[frozenset[str]] = frozenset(k for k, (s, _) in _EMBEDDINGS.items() if s == "ignored")
    model: str = Field("", max_length=512)
    input: str | list[str] | list[int] | list[list[int]]
    # The openai library asks for base64 (little-endian float32) by default: it is smaller.
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    ttl: float | None = None


def model_entry(info, served_ctx: int | None = None) -> dict:
    """A /v1/models entry with what LM Studio's (/api/v0/models) and llama.cpp's (meta) lists carry:
    the context the server gives and the model's capabilities."""
    ctx = served_ctx or served_context_of(info)
    return {"id": info.name, "object": "model", "created": int(info.modified_at), "owned_by": info.source,
            "max_context_length": info.context_length, "loaded_context_length": ctx,
            "context_length": ctx, "capabilities": capabilities(info),
            "meta": {"n_ctx_train": info.context_length, "n_ctx": ctx}}


@router.get("/models")
async def list_models(request: Request) -> dict:
    ctx = ctx_of(request)
    return {"object": "list", "data": [model_entry(m, served_ctx_of(ctx, m)) for m in ctx.manager.registry.list()]}


@router.get("/models/{model:path}")
async def get_model(model: str, request: Request) -> dict:
    ctx = ctx_of(request)
    info = await ctx.manager.resolve(model)
    return model_entry(info, served_ctx_of(ctx, info))


@router.post("/completions")
async def completions(body: CompletionBody, request: Request):
    ctx = ctx_of(request)
    prompt = await _prompt_text(body.prompt, body.model, request)
    kind = RequestKind.INFILL if body.suffix is not None else RequestKind.COMPLETION
    gen_request = GenerateRequest(kind, sampling_of(body, body.max_tokens), prompt=prompt, suffix=body.suffix or "",
                                  top_logprobs=body.logprobs if body.logprobs is not None else -1)
    gen = await start_generation(ctx.manager, ctx.metrics, body.model, gen_request, body.ttl)
    echo = prompt if body.echo else ""
    return await _respond(gen, body, echo, request)


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


def _text_choice(gen: Generation, echo: str) -> dict:
    logprobs = legacy_logprobs_json(gen.logprobs, len(echo)) if gen.request.top_logprobs >= 0 else None
    return {"index": 0, "text": echo + gen.totals.text, "logprobs": logprobs,
            "finish_reason": FINISH_NAMES[gen.totals.finish_reason]}


async def _respond(gen: Generation, body: CompletionBody, echo: str, client: Request):
    ident, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
    if not body.stream:
        await gen.collect(client)
        return JSONResponse({"id": ident, "object": "text_completion", "created": created, "model": gen.model,
                             "system_fingerprint": "ebbtide", "choices": [_text_choice(gen, echo)],
                             "usage": usage_json(gen)})
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    with_logprobs = gen.request.top_logprobs >= 0

    def frame(choices: list, usage: dict | None = None) -> bytes:
        payload = {"id": ident, "object": "text_completion", "created": created, "model": gen.model,
                   "system_fingerprint": "ebbtide", "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return sse(payload)

    async def events():
        first = True
        async for chunk in gen.chunks():
            if chunk.text or first or chunk.finish_reason is not None:
                finish = FINISH_NAMES[chunk.finish_reason] if chunk.finish_reason is not None else None
                lp = legacy_logprobs_json(list(chunk.logprobs)) if with_logprobs else None
                yield frame([{"index": 0, "text": (echo if first else "") + chunk.text, "logprobs": lp,
                              "finish_reason": finish}])
                first = False
        if include_usage:
            yield frame([], usage_json(gen))
        yield sse("[DONE]")

    return StreamingResponse(guarded(events(), gen.close, Dialect.OPENAI), media_type=SSE_MEDIA, headers=STREAM_HEADERS)


@router.post("/embeddings")
async def embeddings(body: EmbeddingBody, request: Request) -> dict:
    ctx = ctx_of(request)
    lease = await ctx.manager.lease(body.model, body.ttl)
    try:
        texts = _embedding_texts(body.input, lease)
        result = await _run(lease.engine.embed, texts)
    finally:
        lease.release()
    encode = _base64_floats if body.encoding_format == "base64" else list
    vectors = [shorten(v, body.dimensions) for v in result.vectors]
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
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
