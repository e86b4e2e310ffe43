"""Chat messages as clients send them -> engines.types.ChatMessage.

OpenAI content may be a string, null (an assistant turn that only called
tools) or a list of parts ([{"type": "text", "text": ...}]); Ollama's is a
string. Text parts are joined; images are refused with a clear message since
no engine here sees images.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.server.errors import BadRequest
from engines.types import ChatMessage

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# OpenAI's newer "developer" role is what "system" was; chat templates know only "system".
ROLE_ALIASES = {"developer": "system", "function": "tool"}
IMAGES_REFUSED = "images: this model takes text only (no engine here has a vision encoder)"


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str = "text"
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str = Field(..., max_length=32)
    content: str | list[ContentPart] | None = None
    images: list[str] | None = None  # Ollama


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


def to_messages(messages: list[ChatMessageIn]) -> tuple[ChatMessage, ...]:
    out = []
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise BadRequest(f"messages[{i}].role: {message.role!r} is not one of {', '.join(ROLES)}")
        out.append(ChatMessage(ROLE_ALIASES.get(message.role, message.role), _text_of(message)))
    return tuple(out)
