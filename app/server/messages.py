"""Chat messages as clients send them -> engines.types.ChatMessage.

OpenAI content may be a string, null (an assistant turn that only called
tools) or a list of parts ([{"type": "text", "text": ...}]); Ollama's is a
string. Text parts are joined; images are refused with a clear message since
no engine here sees images. Assistant turns carry their tool calls (OpenAI's
arguments are a JSON string, Ollama's an object: templates get an object, as
llama.cpp's --jinja gives them); tool turns carry the call they answer
(OpenAI tool_call_id) or the tool's name (Ollama tool_name); a thinking turn
given back (Ollama `thinking`, `reasoning_content`) reaches the template as
reasoning_content.
"""
from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import Field

from app.server.errors import BadRequest
from app.server.fields import Strict
from engines.types import ChatMessage

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# OpenAI's newer "developer" role is what "system" was; chat templates know only "system".
ROLE_ALIASES = {"developer": "system", "function": "tool"}
IMAGES_REFUSED = "images: this model takes text only (no engine here has a vision encoder)"


class ContentPart(Strict):
    WHERE: ClassVar[str] = "messages[].content[]"
    IGNORED: ClassVar[frozenset[str]] = frozenset({"cache_control"})   # Anthropic-style hints some clients add
    type: str = "text"
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class ChatMessageIn(Strict):
    WHERE: ClassVar[str] = "messages[]"
    IGNORED: ClassVar[frozenset[str]] = frozenset({"refusal", "annotations"})   # echoed assistant fields
    role: str = Field(..., max_length=32)
    content: str | list[ContentPart] | None = None
    images: list[str] | None = None  # Ollama
    name: str | None = None          # OpenAI: a participant's or (tool turn) the tool's name
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None     # Ollama
    thinking: str | None = None      # Ollama
    reasoning_content: str | None = None


def _text_of(message: ChatMessageIn) -> str:
    if message.images:
        raise BadRequest(IMAGES_REFUSED)
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text":
            raise BadRequest(f"content part of type {part.type!r}: this model takes text only")
        texts.append(part.text or "")
    return "".join(texts)


def _tool_call(i: int, call: dict) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRequest(f"messages[{i}].tool_calls: each needs function.name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise BadRequest(f"messages[{i}].tool_calls: arguments are not JSON") from None
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if call.get("id"):
        out["id"] = call["id"]
    return out


def to_messages(messages: list[ChatMessageIn]) -> tuple[ChatMessage, ...]:
    out = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise BadRequest(f"messages[{i}].role: {message.role!r} is not one of {', '.join(ROLES)}")
        calls = tuple(_tool_call(i, c) for c in message.tool_calls or ())
        out.append(ChatMessage(ROLE_ALIASES.get(message.role, message.role), _text_of(message), tool_calls=calls,
                               tool_call_id=message.tool_call_id or "",
                               name=message.tool_name or message.name or "",
                               thinking=message.thinking or message.reasoning_content or ""))
    return tuple(out)
