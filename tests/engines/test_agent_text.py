"""Tool-call parsing per family format, reasoning split while streaming, and llama.cpp's n_indent:
the text-level pieces the routes build on (no model needed)."""
from __future__ import annotations

import json

import jsonschema
import pytest

from app.server.indent import IndentGuard
from engines.text.reasoning import ReasoningSplitter, split_reasoning, starts_thinking
from engines.text.tool_calls import call_schema, may_open_call, parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("text, expected", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
     [("get_weather", {"city": "Oslo"})]),
    ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', [("get_weather", {"city": "Oslo"})]),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}',
     [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "abc123def"}]',
     [("get_weather", {"city": "Oslo"})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}', [("get_weather", {"city": "Oslo"})]),
    ('```json\n{"name": "get_time", "arguments": "{}"}\n```', [("get_time", {})]),
    ('{"tool_calls": [{"function": {"name": "get_time", "arguments": {}}}]}', [("get_time", {})]),
])
def test_each_family_format_parses(text, expected) -> None:
    _, calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == expected


@pytest.mark.parametrize("text", ["Hello there", '{"answer": 42}', "[1, 2, 3]", "<tool_call>not json</tool_call>"])
def test_text_that_is_no_call_stays_text(text) -> None:
    rest, calls = parse_tool_calls(text)
    assert calls == [] and rest == text


def test_call_schema_accepts_only_the_named_tools_calls() -> None:
    schema = call_schema((WEATHER, TIME))
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {}}, schema)
    named = call_schema((WEATHER, TIME), "get_time")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {"city": "x"}}, named)


def test_may_open_call_holds_only_what_could_be_a_call() -> None:
    assert may_open_call("  <tool") and may_open_call("{") and may_open_call("[TOOL")
    assert not may_open_call("Hi") and not may_open_call("The answer")


def test_reasoning_split_survives_tags_cut_anywhere() -> None:
    text = "<think>\nweigh it up</think>\n\nThe answer."
    for cut in range(1, len(text)):
        splitter = ReasoningSplitter()
        pieces = [splitter.feed(text[:cut]), splitter.feed(text[cut:]), splitter.flush()]
        assert "".join(p[0] for p in pieces) == "\nweigh it up".lstrip("\n")
        assert "".join(p[1] for p in pieces) == "The answer."


def test_reasoning_opened_by_the_template() -> None:
    assert starts_thinking("<|im_start|>assistant\n<think>\n")
    assert split_reasoning("plan</think>answer", inside=True) == ("plan", "answer")
    assert split_reasoning("no tags at all") == ("", "no tags at all")


def test_n_indent_cuts_the_line_that_dedents() -> None:
    guard = IndentGuard(4)
    text = "x = 1\n    y = 2\n\n    z = 3\nreturn x\n"
    out = "".join(guard.feed(ch) for ch in text) + guard.flush()
    assert guard.stopped and out == "x = 1\n    y = 2\n\n    z = 3\n"
    assert IndentGuard(0).feed(text) == text
    json.dumps(out)
