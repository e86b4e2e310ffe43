"""Tool calls: the JSON schema a forced call must match, and a model's output parsed into calls.

Families write calls differently, and the parser knows each (llama.cpp's
common/chat.cpp does the same per template):
  - Qwen 2.5 / Qwen3 / Hermes: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, repeated;
  - Llama 3.x: `<|python_tag|>{"name": ..., "parameters": {...}}` or the bare JSON object
    (several joined by `;`);
  - Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v0.3) or
    `[TOOL_CALLS]name[ARGS]{...}` (2501 and later);
  - anything else: the whole answer as one JSON call object, a list of them, or
    `{"tool_calls": [...]}`, fenced in ``` or not (the generic fallback).
Special tokens such as `<|python_tag|>` are often dropped by detokenizing, which
leaves the bare JSON that the fallback reads. With tool_choice "required" or a
named tool, decoding is constrained to `call_schema()` (a generic call object),
which the fallback parses.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
MISTRAL_ARGS = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.\-]+)\s*\[ARGS\]\s*", re.S)
FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
# Text that may open a call: the answer is held back (not streamed as text) while it could be one.
CALL_OPENERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{", "[", "```")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str = ""

    def with_id(self) -> ToolCall:
        return self if self.id else ToolCall(self.name, self.arguments, "call_" + uuid.uuid4().hex[:24])

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def function_of(tool: dict) -> dict:
    """The function definition of an OpenAI/Ollama tool entry ({"type": "function", "function": {...}})."""
    return tool.get("function", tool)


def call_schema(tools: tuple[dict, ...], name: str | None = None) -> dict:
    """The JSON schema of one call to `name` (or to any of tools): {"name", "arguments"}."""
    functions = [function_of(t) for t in tools if name is None or function_of(t).get("name") == name]
    options = [{"type": "object",
                "properties": {"name": {"const": f["name"]},
                               "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _as_call(value: Any) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    value = value.get("function", value)
    name = value.get("name")
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return ToolCall(name, args)


def _calls_in(value: Any) -> list[ToolCall]:
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(v) for v in items]
    return calls if calls and all(calls) else []


def _json_prefix(text: str) -> tuple[Any, str] | None:
    """The JSON value text starts with, and what follows it."""
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    return value, text[end:]


def _generic(text: str) -> list[ToolCall]:
    text = text.strip()
    fenced = FENCE.match(text)
    text = fenced.group(1) if fenced else text.removeprefix("<|python_tag|>").strip()
    calls: list[ToolCall] = []
    while text:   # Llama 3.x joins several calls with ";"
        parsed = _json_prefix(text)
        if parsed is None:
            return []
        found = _calls_in(parsed[0])
        if not found:
            return []
        calls += found
        text = parsed[1].strip().lstrip(";").strip()
    return calls


def _hermes(text: str) -> list[ToolCall]:
    calls = []
    for body in HERMES.findall(text):
        parsed = _json_prefix(body)
        calls += _calls_in(parsed[0]) if parsed else []
    return calls


def _mistral(text: str) -> list[ToolCall]:
    named = MISTRAL_ARGS.split(text)
    if len(named) > 1:   # [TOOL_CALLS]name[ARGS]{...}, repeated
        calls = []
        for name, rest in zip(named[1::2], named[2::2]):
            parsed = _json_prefix(rest.strip())
            if parsed and isinstance(parsed[0], dict):
                calls.append(ToolCall(name, parsed[0]))
        return calls
    return _generic(text.split("[TOOL_CALLS]", 1)[1])


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(the text that is not a call, the calls) of a finished answer."""
    if "<tool_call>" in text:
        calls = _hermes(text)
        return (text.split("<tool_call>", 1)[0].strip(), calls) if calls else (text, [])
    if "[TOOL_CALLS]" in text:
        calls = _mistral(text)
        return (text.split("[TOOL_CALLS]", 1)[0].strip(), calls) if calls else (text, [])
    calls = _generic(text)
    return ("", calls) if calls else (text, [])


def may_open_call(text: str) -> bool:
    """Could an answer that starts with `text` still turn out to be a call?"""
    head = text.lstrip()
    return any(head.startswith(o) or o.startswith(head) for o in CALL_OPENERS)
