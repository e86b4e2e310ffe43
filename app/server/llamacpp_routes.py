"""llama.cpp server dialect: /health, /completion, /infill, /tokenize, /detokenize.

Editors that speak llama.cpp (llama.vscode, llama.vim) send these. There is no
model field in llama.cpp's API, so they serve the default model (or the one a
client names in an optional "model" field). /infill folds llama.cpp's pieces
into one fill-in-the-middle request: input_extra (other files) as extra
context, input_prefix + prompt (the current line up to the cursor) as the
prefix, input_suffix as the suffix. n_predict 0 is llama.vscode's warm-up: it
loads the model and answers an empty completion.
"""
from __future__ import annotations

from dataclasses import replace

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.server.context import ctx_of
from app.server.errors import Dialect
from app.server.generation import Generation, start_generation
from app.server.generation import detokenize as detokenize_ids
from app.server.sampling import make_sampling
from app.server.streaming import SSE_MEDIA, STREAM_HEADERS, guarded, sse
from engines.types import FinishReason, GenerateRequest, RequestKind

router = APIRouter(tags=["llama.cpp"])

STOP_TYPES = {FinishReason.STOP: "eos", FinishReason.LENGTH: "limit", FinishReason.CANCELLED: "none", None: "none"}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field("", max_length=512)
    n_predict: int | None = -1
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = Field(None, ge=0)
    repeat_last_n: int | None = Field(None, ge=-1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = False
    ignore_eos: bool | None = False


class CompletionBody(_Sampling):
    prompt: str | list[int] = ""


class ExtraChunk(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    filename: str = ""
    text: str = ""


class InfillBody(_Sampling):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list, max_length=1024)
    prompt: str = ""


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field("", max_length=512)
    content: str = ""
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field("", max_length=512)
    tokens: list[int] = Field(default_factory=list)


def _sampling(body: _Sampling):
    sampling = make_sampling(max_tokens=body.n_predict, temperature=body.temperature, top_k=body.top_k,
                         top_p=body.top_p, min_p=body.min_p, seed=body.seed, stop=body.stop,
                         repeat_penalty=body.repeat_penalty, repeat_last_n=body.repeat_last_n,
                         presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
    return replace(sampling, ignore_eos=True) if body.ignore_eos else sampling


@router.get("/health")
async def health() -> dict:
    # Models load lazily on first request, so the server itself is always ready.
    return {"status": "ok"}


@router.post("/completion")
@router.post("/completions", include_in_schema=False)
async def completion(body: CompletionBody, request: Request):
    ctx = ctx_of(request)
    sampling = _sampling(body)
    prompt = body.prompt
    if isinstance(prompt, list):
        prompt = await detokenize_ids(ctx.manager, body.model, prompt)
    gen_request = GenerateRequest(RequestKind.COMPLETION, sampling, prompt=prompt)
    gen = await start_generation(ctx.manager, ctx.metrics, body.model, gen_request)
    return await _respond(gen, bool(body.stream), request)


@router.post("/infill")
async def infill(body: InfillBody, request: Request):
    ctx = ctx_of(request)
    sampling = _sampling(body)
    if body.n_predict == 0:  # llama.vscode's warm-up: load (and cache) only
        lease = await ctx.manager.lease(body.model)
        lease.release()
        return JSONResponse(_empty_result(lease.loaded.name))
    extra = tuple(_extra_text(chunk) for chunk in body.input_extra)
    gen_request = GenerateRequest(RequestKind.INFILL, sampling, prompt=body.input_prefix + body.prompt,
                                  suffix=body.input_suffix, extra_context=extra)
    gen = await start_generation(ctx.manager, ctx.metrics, body.model, gen_request)
    return await _respond(gen, bool(body.stream), request)


def _extra_text(chunk: ExtraChunk) -> str:
    # llama.cpp writes each extra file as "<file-sep>filename\ntext"; the engine adds separators.
    return f"{chunk.filename}\n{chunk.text}" if chunk.filename else chunk.text


def _timings(gen: Generation) -> dict:
    usage = gen.usage()
    prompt_ms, predicted_ms = usage.prompt_eval_ns / 1e6, usage.eval_ns / 1e6
    return {
        "prompt_n": usage.prompt_tokens, "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / usage.prompt_tokens if usage.prompt_tokens else 0.0,
        "prompt_per_second": usage.prompt_tokens / (prompt_ms / 1e3) if prompt_ms else 0.0,
        "predicted_n": usage.completion_tokens, "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / usage.completion_tokens if usage.completion_tokens else 0.0,
        "predicted_per_second": usage.completion_tokens / (predicted_ms / 1e3) if predicted_ms else 0.0,
    }


def _final(gen: Generation, content: str) -> dict:
    usage = gen.usage()
    return {"index": 0, "content": content, "tokens": [], "id_slot": 0, "stop": True, "model": gen.model,
            "tokens_predicted": usage.completion_tokens, "tokens_evaluated": usage.prompt_tokens,
            "tokens_cached": usage.cached_tokens, "stop_type": STOP_TYPES[gen.totals.finish_reason],
            "stopping_word": "", "truncated": False, "has_new_line": "\n" in gen.totals.text,
            "timings": _timings(gen)}


def _empty_result(model: str) -> dict:
    return {"index": 0, "content": "", "tokens": [], "id_slot": 0, "stop": True, "model": model,
            "tokens_predicted": 0, "tokens_evaluated": 0, "tokens_cached": 0, "stop_type": "limit",
            "stopping_word": "", "truncated": False, "has_new_line": False, "timings": {}}


async def _respond(gen: Generation, stream: bool, client: Request):
    if not stream:
        totals = await gen.collect(client)
        return JSONResponse(_final(gen, totals.text))

    async def events():
        async for chunk in gen.chunks():
            if chunk.text:
                yield sse({"index": 0, "content": chunk.text, "tokens": list(chunk.token_ids), "stop": False,
                           "id_slot": 0, "tokens_predicted": gen.totals.completion_tokens})
        yield sse(_final(gen, ""))

    return StreamingResponse(guarded(events(), gen.close, Dialect.LLAMACPP), media_type=SSE_MEDIA,
                             headers=STREAM_HEADERS)


@router.post("/tokenize")
async def tokenize(body: TokenizeBody, request: Request) -> dict:
    lease = await ctx_of(request).manager.lease(body.model)
    try:
        engine = lease.engine
        ids = await to_thread.run_sync(engine.tokenize, body.content, body.add_special)
        if not body.with_pieces:
            return {"tokens": ids}
        pieces = [await to_thread.run_sync(engine.detokenize, [i]) for i in ids]
        return {"tokens": [{"id": i, "piece": p} for i, p in zip(ids, pieces)]}
    finally:
        lease.release()


@router.post("/detokenize")
async def detokenize(body: DetokenizeBody, request: Request) -> dict:
    return {"content": await detokenize_ids(ctx_of(request).manager, body.model, body.tokens)}
