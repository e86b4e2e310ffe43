"""OpenAI dialect, chat: /v1/chat/completions with tools, structured output, reasoning, logprobs.

The answer goes through the OutputShaper (shaping.py): thinking becomes
`reasoning_content` (llama.cpp's and DeepSeek's field), calls become
`tool_calls` with finish_reason "tool_calls". Streamed, a call arrives as the
openai library assembles it: one delta with index, id, type and name (empty
arguments), then one with the arguments' JSON, then the finish.
"""
from __future__ import annotations

import time
import uuid
from typing import ClassVar, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from app.server.context import ctx_of
from app.server.errors import BadRequest, Dialect
from app.server.fields import FIELDS, Strict
from app.server.generation import Generation, start_generation
from app.server.messages import ChatMessageIn, to_messages
from app.server.openai_common import OpenAICommon, logprobs_json, sampling_of, usage_json
from app.server.sampling import FINISH_NAMES
from app.server.shaping import OutputShaper, make_shaper
from app.server.streaming import SSE_MEDIA, STREAM_HEADERS, guarded, sse
from app.server.structured import check_think, openai_response_format, tool_plan, with_generic_tools
from engines.types import GenerateRequest, RequestKind

router = APIRouter(prefix="/v1", tags=["openai"])
_TABLE = FIELDS["POST /v1/chat/completions"]
EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high"}


class TemplateKwargs(Strict):
    WHERE: ClassVar[str] = "chat_template_kwargs"
    enable_thinking: bool | None = None


class ChatCompletionBody(OpenAICommon):
    IGNORED: ClassVar[frozenset[str]] = frozenset(k for k, (s, _) in _TABLE.items() if s == "ignored")
    REFUSED: ClassVar[dict[str, str]] = {k: n for k, (s, n) in _TABLE.items() if s == "400"}
    messages: list[ChatMessageIn] = Field(..., min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: TemplateKwargs | None = None

    def think(self) -> bool | str | None:
        kwargs = self.chat_template_kwargs
        if kwargs is not None and kwargs.enable_thinking is not None:
            return kwargs.enable_thinking
        return EFFORTS[self.reasoning_effort] if self.reasoning_effort else None


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionBody, request: Request):
    ctx = ctx_of(request)
    info = await ctx.manager.resolve(body.model)
    plan = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls)
    constraint = plan.constraint or openai_response_format(body.response_format)
    think = check_think(body.think(), info, constraint is not None)
    if plan.constraint is not None and body.response_format and body.response_format.get("type") != "text":
        raise BadRequest("response_format: cannot be combined with tool_choice required or named")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    messages = with_generic_tools(to_messages(body.messages), plan, info)
    gen_request = GenerateRequest(RequestKind.CHAT, sampling_of(body, max_tokens), messages=messages,
                                  tools=plan.tools, think=think, constraint=constraint,
                                  top_logprobs=(body.top_logprobs or 0) if body.logprobs else -1)
    shaper = make_shaper(info, plan, messages, think)
    gen = await start_generation(ctx.manager, ctx.metrics, info.name, gen_request, body.ttl)
    if not body.stream:
        return await _whole(gen, shaper, request)
    return _streamed(gen, shaper, body)


def _calls_json(shaper: OutputShaper) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in shaper.calls]


def _finish(gen: Generation, shaper: OutputShaper) -> str:
    return "tool_calls" if shaper.calls else FINISH_NAMES[gen.totals.finish_reason]


async def _whole(gen: Generation, shaper: OutputShaper, client: Request) -> JSONResponse:
    totals = await gen.collect(client)
    shaper.feed(totals.text)
    shaper.finish()
    message: dict = {"role": "assistant", "content": shaper.content if shaper.content or not shaper.calls else None}
    if shaper.thinking:
        message["reasoning_content"] = shaper.thinking
    if shaper.calls:
        message["tool_calls"] = _calls_json(shaper)
    logprobs = logprobs_json(gen.logprobs) if gen.request.top_logprobs >= 0 else None
    return JSONResponse({"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion",
                         "created": int(time.time()), "model": gen.model, "system_fingerprint": "ebbtide",
                         "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                                      "finish_reason": _finish(gen, shaper)}],
                         "usage": usage_json(gen)})


def _streamed(gen: Generation, shaper: OutputShaper, body: ChatCompletionBody) -> StreamingResponse:
    ident, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    with_logprobs = gen.request.top_logprobs >= 0

    def frame(delta: dict | None, finish: str | None = None, logprobs=None, usage: dict | None = None) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": finish}]
        payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": gen.model,
                   "system_fingerprint": "ebbtide", "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return sse(payload)

    def deltas(piece) -> list[dict]:
        out = [{"reasoning_content": piece.thinking}] if piece.thinking else []
        return out + ([{"content": piece.content}] if piece.content else [])

    async def events():
        yield frame({"role": "assistant", "content": ""})
        async for chunk in gen.chunks():
            lp = logprobs_json(chunk.logprobs) if with_logprobs and chunk.logprobs else None
            parts = deltas(shaper.feed(chunk.text))
            for i, delta in enumerate(parts):
                yield frame(delta, logprobs=lp if i == 0 else None)
            if lp is not None and not parts:   # held back (a call may be coming): the logprobs still go
                yield frame({}, logprobs=lp)
        for delta in deltas(shaper.finish()):
            yield frame(delta)
        for index, call in enumerate(shaper.calls):
            yield frame({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                         "function": {"name": call.name, "arguments": ""}}]})
            yield frame({"tool_calls": [{"index": index, "function": {"arguments": call.arguments_json}}]})
        yield frame({}, _finish(gen, shaper))
        if include_usage:
            yield frame(None, usage=usage_json(gen))
        yield sse("[DONE]")

    return StreamingResponse(guarded(events(), gen.close, Dialect.OPENAI), media_type=SSE_MEDIA,
                             headers=STREAM_HEADERS)
