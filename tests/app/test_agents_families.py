"""Tools, thinking and context on tiny random-weight GGUFs that carry each family's chat template
(Llama 3.x, Qwen 2.5 / Hermes, Mistral v0.3, Qwen3 thinking), through the real `openai` and
`ollama` libraries against one real daemon. Random weights say nothing sensible, so what is
checked is what the server guarantees whatever the model says: a forced tool call is a valid
call of the schema, thinking lands in its own field, the context is what /api/show says."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import jsonschema
import ollama
import openai
import pytest

from family_templates import LLAMA3, MISTRAL, QWEN3_THINKING, QWEN25

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
from tiny_families import FAMILY_CASES, random_state, write_family_gguf  # noqa: E402

TRAINED_CTX = 8192
SERVED_CTX = 4096     # the daemon's max_context setting below: the old default, raised per request
FAMILIES = {"tiny-llama3": ("llama-yarn", LLAMA3), "tiny-qwen25": ("qwen2", QWEN25),
            "tiny-mistral": ("mistral-window", MISTRAL), "tiny-qwen3-thinking": ("qwen3", QWEN3_THINKING)}
ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": ARGS}},
         {"type": "function", "function": {"name": "clock", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
ASK = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Oslo for 3 days?"}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, spawn_daemon):
    models = tmp_path_factory.mktemp("family-models")
    for name, (case, template) in FAMILIES.items():
        cfg, extra = FAMILY_CASES[case]
        cfg = cfg.replace(max_context=TRAINED_CTX)
        write_family_gguf(models / f"{name}.gguf", cfg, extra, random_state(cfg), chat_template=template)
    home = tmp_path_factory.mktemp("family-home")
    server = spawn_daemon(home, f'model_dirs = ["{models}"]\nmax_context = {SERVED_CTX}\n')
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oai(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def oll(daemon) -> ollama.Client:
    return ollama.Client(host=daemon.url, timeout=300)


def _valid_call(name: str, arguments: str | dict) -> None:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)
    jsonschema.validate(args, schema)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_tool_call_required_streamed_and_not(oai, model) -> None:
    reply = oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                        temperature=0, max_tokens=400)
    assert reply.choices[0].finish_reason == "tool_calls"
    for call in reply.choices[0].message.tool_calls:
        _valid_call(call.function.name, call.function.arguments)
    with oai.chat.completions.stream(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                     temperature=0, max_tokens=400) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and [c.function.name for c in calls] == [c.function.name for c in reply.choices[0].message.tool_calls]
    for call in calls:
        _valid_call(call.function.name, call.function.arguments)


def test_history_with_calls_renders_in_every_family(oai) -> None:
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_abcdefghi", "type": "function",
        "function": {"name": "forecast", "arguments": json.dumps({"city": "Oslo", "days": 3})}}]},
        {"role": "tool", "tool_call_id": "call_abcdefghi", "content": "\"rain\""}]
    for model in FAMILIES:
        reply = oai.chat.completions.create(model=model, messages=history, tools=TOOLS, temperature=0, max_tokens=2)
        assert reply.usage.prompt_tokens > 100   # the tools and the call are in the prompt


def test_ollama_tools_named_in_capabilities_and_think(oll) -> None:
    for model in FAMILIES:
        caps = oll.show(model).capabilities
        assert "tools" in caps
        assert ("thinking" in caps) == (model == "tiny-qwen3-thinking")
    thinking = oll.chat(model="tiny-qwen3-thinking", messages=ASK[1:], think=True,
                        options={"temperature": 0, "num_predict": 24})
    assert thinking.message.thinking and not thinking.message.content
    plain = oll.chat(model="tiny-qwen3-thinking", messages=ASK[1:], think=False,
                     options={"temperature": 0, "num_predict": 24})
    assert not plain.message.thinking and plain.message.content
    with pytest.raises(ollama.ResponseError) as err:
        oll.chat(model="tiny-qwen25", messages=ASK[1:], think=True)
    assert err.value.status_code == 400


def test_openai_reasoning_content_in_deltas(oai) -> None:
    chunks = list(oai.chat.completions.create(model="tiny-qwen3-thinking", messages=ASK[1:], stream=True,
                                              temperature=0, max_tokens=16, reasoning_effort="low"))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert reasoning


def test_ollama_tool_calls_parsed_into_message(oll) -> None:
    # Ollama has no tool_choice; its format forces a call-shaped answer, which the parser reads.
    schema = {"type": "object", "properties": {"name": {"const": "clock"}, "arguments": TOOLS[1]["function"]["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False}
    for stream in (False, True):
        reply = oll.chat(model="tiny-qwen25", messages=ASK[1:], tools=TOOLS, format=schema, stream=stream,
                         options={"temperature": 0, "num_predict": 200})
        parts = list(reply) if stream else [reply]
        calls = [c for p in parts for c in (p.message.tool_calls or [])]
        assert [c.function.name for c in calls] == ["clock"]
        _valid_call("clock", dict(calls[0].function.arguments))


def test_context_is_what_show_says_and_num_ctx_raises_it(daemon, oll) -> None:
    model = "tiny-llama3"
    shown = oll.show(model)
    assert shown.parameters.strip() == f"num_ctx {SERVED_CTX}"
    assert shown.modelinfo["llama.context_length"] == SERVED_CTX
    prompt = "ab " * 2000    # ~6,000 tokens of this byte-level vocabulary: over the old 4,096 default
    with pytest.raises(ollama.ResponseError) as err:
        oll.generate(model=model, prompt=prompt, raw=True, options={"num_predict": 1})
    assert err.value.status_code == 400 and "context" in str(err.value)
    reply = oll.generate(model=model, prompt=prompt, raw=True, options={"num_predict": 2, "num_ctx": TRAINED_CTX})
    assert reply.prompt_eval_count > SERVED_CTX
    assert oll.show(model).parameters.strip() == f"num_ctx {TRAINED_CTX}"
    running = {m.model: m for m in oll.ps().models}
    with httpx.Client(base_url=daemon.url, trust_env=False) as client:
        entry = next(m for m in client.get("/api/ps").json()["models"] if m["name"] == model)
        listed = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == model)
    assert model in running and entry["context_length"] == TRAINED_CTX
    assert listed["loaded_context_length"] == TRAINED_CTX and listed["max_context_length"] == TRAINED_CTX
    assert "tools" in listed["capabilities"]
    # A smaller num_ctx bounds this request: the same prompt no longer fits it.
    with pytest.raises(ollama.ResponseError):
        oll.generate(model=model, prompt=prompt, raw=True, options={"num_predict": 1, "num_ctx": 2048})
