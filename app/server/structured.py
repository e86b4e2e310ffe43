"""What a request asks of the answer's shape, from any dialect -> engines.types.Constraint,
tools and the thinking switch, checked at the edge.

  OpenAI    response_format {type: text | json_object | json_schema{schema, strict}},
            tools + tool_choice (none | auto | required | {type: function, function: {name}}),
            reasoning_effort, chat_template_kwargs.enable_thinking
  Ollama    format: "json" | {schema}, tools, think: bool | "low" | "medium" | "high"
  llama.cpp json_schema, grammar (GBNF)
A schema that is not a JSON schema, a tool_choice naming no tool, and `think`
on a model whose template does not think answer 400 (Ollama answers
"<model> does not support thinking" the same way).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.server.errors import BadRequest
from engines.base import ModelInfo
from engines.text.chat_template import ChatTemplate
from engines.text.tool_calls import call_schema, function_of
from engines.types import Constraint

JSON_OBJECT = {"type": "object"}
THINK_LEVELS = ("low", "medium", "high")


def _schema_constraint(schema: Any, where: str) -> Constraint:
    if isinstance(schema, bool) or not isinstance(schema, dict):
        raise BadRequest(f"{where}: a JSON schema must be an object")
    try:
        from jsonschema.validators import validator_for

        validator_for(schema).check_schema(schema)
    except ImportError:   # jsonschema is a dependency; without it the grammar compilers still check
        pass
    except Exception as exc:   # jsonschema's SchemaError
        raise BadRequest(f"{where}: not a valid JSON schema: {getattr(exc, 'message', exc)}") from None
    return Constraint("json_schema", json.dumps(schema))


def openai_response_format(value: dict | None) -> Constraint | None:
    if value is None:
        return None
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return Constraint("json_schema", json.dumps(JSON_OBJECT))
    if kind == "json_schema":
        spec = value.get("json_schema") or {}
        if not isinstance(spec, dict) or "schema" not in spec:
            raise BadRequest("response_format.json_schema.schema: required")
        return _schema_constraint(spec["schema"], "response_format.json_schema.schema")
    raise BadRequest(f"response_format.type: {kind!r} is not one of text, json_object, json_schema")


def ollama_format(value: str | dict | None) -> Constraint | None:
    if value in (None, ""):
        return None
    if value == "json":
        return Constraint("json_schema", json.dumps(JSON_OBJECT))
    if isinstance(value, dict):
        return _schema_constraint(value, "format")
    raise BadRequest(f"format: {value!r} is neither \"json\" nor a JSON schema")


def llamacpp_constraint(json_schema: dict | None, grammar: str | None) -> Constraint | None:
    if json_schema is not None and grammar:
        raise BadRequest("json_schema and grammar: send one of them")
    if grammar:
        return Constraint("gbnf", grammar)
    return _schema_constraint(json_schema, "json_schema") if json_schema is not None else None


@dataclass(frozen=True)
class ToolPlan:
    """The tools the template renders, and whether the answer is forced into a call."""
    tools: tuple[dict, ...] = ()
    constraint: Constraint | None = None
    parallel: bool = True

    @property
    def expects_calls(self) -> bool:
        return bool(self.tools)


def _checked_tools(tools: list[dict] | None) -> tuple[dict, ...]:
    out = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise BadRequest(f"tools[{i}].type: only \"function\" tools are supported")
        fn = function_of(tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"tools[{i}].function.name: required")
        params = fn.get("parameters")
        if params is not None:
            _schema_constraint(params, f"tools[{i}].function.parameters")
        out.append({"type": "function", "function": fn})
    return tuple(out)


def tool_plan(tools: list[dict] | None, tool_choice: str | dict | None, parallel: bool | None) -> ToolPlan:
    checked = _checked_tools(tools)
    choice = tool_choice if tool_choice is not None else "auto"
    if not checked:
        if choice not in ("none", "auto"):
            raise BadRequest("tool_choice: there are no tools to choose from")
        return ToolPlan()
    if choice == "none":
        return ToolPlan()   # the model is not told of the tools, as OpenAI's "none" means
    if choice == "auto":
        return ToolPlan(checked, None, parallel is not False)
    if choice == "required":
        return ToolPlan(checked, Constraint("json_schema", json.dumps(call_schema(checked))), parallel is not False)
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in {function_of(t)["name"] for t in checked}:
            raise BadRequest(f"tool_choice.function.name: {name!r} is not one of the tools")
        return ToolPlan(checked, Constraint("json_schema", json.dumps(call_schema(checked, name))), False)
    raise BadRequest(f"tool_choice: {choice!r} is not none, auto, required or a named function")


def template_of(info: ModelInfo) -> ChatTemplate:
    return ChatTemplate(info.chat_template or None)


def capabilities(info: ModelInfo) -> list[str]:
    """What the model can do, as Ollama's /api/show lists it: from its template and tokens."""
    template = template_of(info)
    caps = ["completion"]
    if info.can_infill:
        caps.append("insert")   # Zed and Continue offer edit predictions/autocomplete on this
    if template.supports_tools:
        caps.append("tools")
    if template.supports_thinking:
        caps.append("thinking")
    caps.append("embedding")    # every model here embeds (pooled hidden states)
    return caps


def check_think(think: bool | str | None, info: ModelInfo, constrained: bool = False) -> bool | str | None:
    """The thinking switch as the template gets it; 400 where the model cannot think.
    A constrained answer (a JSON schema, a forced tool call) is the schema from its first
    token, so a thinking template is told not to think (Qwen3's enable_thinking false);
    asking for both answers 400."""
    if constrained and think not in (None, False):
        raise BadRequest("think: cannot be combined with a forced format (format, response_format, "
                         "tool_choice required or named) on this server")
    if constrained and template_of(info).supports_thinking:
        return False
    if think is None or think is False:
        return think
    if isinstance(think, str) and think not in THINK_LEVELS:
        raise BadRequest(f"think: {think!r} is not true, false or one of {', '.join(THINK_LEVELS)}")
    if not template_of(info).supports_thinking:
        raise BadRequest(f"\"{info.name}\" does not support thinking")
    return think


GENERIC_TOOLS_PROMPT = ("You can call these tools. To call one, answer with only a JSON object "
                        '{{"name": <tool name>, "arguments": <arguments object>}}.\n\n{tools}')


def with_generic_tools(messages: tuple, plan: ToolPlan, info: ModelInfo) -> tuple:
    """Where the model's template does not render tools, they go in the system message with the
    generic JSON call format the parser reads (llama.cpp's --jinja does the same for such templates)."""
    if not plan.tools or template_of(info).supports_tools:
        return messages
    from engines.types import ChatMessage

    listing = "\n".join(json.dumps(function_of(t), ensure_ascii=False) for t in plan.tools)
    note = GENERIC_TOOLS_PROMPT.format(tools=listing)
    if messages and messages[0].role == "system":
        first = messages[0]
        return (ChatMessage("system", f"{first.content}\n\n{note}"),) + tuple(messages[1:])
    return (ChatMessage("system", note),) + tuple(messages)
