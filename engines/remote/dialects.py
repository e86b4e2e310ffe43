"""Request bodies and stream parsing for the two API kinds a remote speaks.

Each dialect turns a GenerateRequest into (path, JSON body) and one line of the
remote's stream into a Piece: text, and at the end a finish reason and token counts.
OpenAI streams SSE (`data: {...}`, `data: [DONE]`); Ollama streams NDJSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from engines.errors import InfillUnsupported
from engines.types import FinishReason, GenerateRequest, RequestKind

FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "eos": FinishReason.STOP}


@dataclass(frozen=True)
class Piece:
    text: str = ""
    finish: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


def _messages(request: GenerateRequest) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in request.messages]


def openai_body(request: GenerateRequest, model: str) -> tuple[str, dict]:
    s = request.sampling
    body: dict = {"model": model, "stream": True, "max_tokens": s.max_tokens, "temperature": s.temperature,
                  "top_p": s.top_p, "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
                  "stream_options": {"include_usage": True}}
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if request.kind is RequestKind.CHAT:
        return "/v1/chat/completions", {**body, "messages": _messages(request)}
    if request.kind is RequestKind.INFILL:
        raise InfillUnsupported("fill-in-the-middle is not proxied to OpenAI-compatible remotes")
    return "/v1/completions", {**body, "prompt": request.prompt}


def openai_piece(line: str) -> Piece | None:
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return None
    chunk = json.loads(data)
    if "error" in chunk:
        return Piece(error=str(chunk["error"].get("message", chunk["error"]) if isinstance(chunk["error"], dict)
                               else chunk["error"]))
    usage = chunk.get("usage") or {}
    choice = (chunk.get("choices") or [{}])[0]
    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return Piece(text, FINISH.get(choice.get("finish_reason") or ""), usage.get("prompt_tokens", 0),
                 usage.get("completion_tokens", 0))


def ollama_body(request: GenerateRequest, model: str) -> tuple[str, dict]:
    s = request.sampling
    options: dict = {"num_predict": s.max_tokens, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
                     "min_p": s.min_p, "repeat_penalty": s.repeat_penalty, "repeat_last_n": s.repeat_last_n,
                     "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty}
    if s.seed is not None:
        options["seed"] = s.seed
    if s.stop:
        options["stop"] = list(s.stop)
    body = {"model": model, "stream": True, "options": options}
    if request.kind is RequestKind.CHAT:
        return "/api/chat", {**body, "messages": _messages(request)}
    if request.kind is RequestKind.INFILL:
        return "/api/generate", {**body, "prompt": request.prompt, "suffix": request.suffix, "raw": True}
    return "/api/generate", {**body, "prompt": request.prompt, "raw": True}


def ollama_piece(line: str) -> Piece | None:
    if not line.strip():
        return None
    chunk = json.loads(line)
    if "error" in chunk:
        return Piece(error=str(chunk["error"]))
    text = (chunk.get("message") or {}).get("content") or chunk.get("response") or ""
    if not chunk.get("done"):
        return Piece(text)
    return Piece(text, FINISH.get(chunk.get("done_reason") or "stop", FinishReason.STOP),
                 chunk.get("prompt_eval_count", 0), chunk.get("eval_count", 0))


# kind -> (request body, stream line parser)
DIALECTS = {"openai": (openai_body, openai_piece), "ollama": (ollama_body, ollama_piece)}
