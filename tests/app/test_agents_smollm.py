"""What agents send, through the real `openai` and `ollama` libraries, to the real daemon on the
bundled SmolLM2 (llama.cpp engine): tool calls forced valid by constrained decoding, JSON schema
outputs that validate, logprobs that are probabilities, think refused on a model that cannot."""
from __future__ import annotations

import json
import math

import jsonschema
import ollama
import openai
import pytest

WEATHER_ARGS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": WEATHER_ARGS}}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "pet": {"enum": ["cat", "dog", "none"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def oai(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def oll(live_server) -> ollama.Client:
    return ollama.Client(host=live_server.url, timeout=300)


@pytest.fixture(scope="module")
def model(live_server) -> str:
    return live_server.default_model()


def test_openai_tool_call_required_is_valid(oai, model) -> None:
    reply = oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                        temperature=0, max_tokens=120)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)


def test_openai_tool_call_streamed_assembles_as_the_library_does(oai, model) -> None:
    stream = oai.chat.completions.create(model=model, messages=ASK, tools=TOOLS, stream=True, temperature=0,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                         max_tokens=120)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta_call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = delta_call.id or entry["id"]
            if delta_call.function:
                entry["name"] += delta_call.function.name or ""
                entry["arguments"] += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_ARGS)


def test_openai_tool_result_turn_is_rendered(oai, model) -> None:
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    reply = oai.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                        temperature=0, max_tokens=8)
    assert reply.choices[0].message.content and reply.usage.prompt_tokens > 20


def test_openai_json_schema_validates(oai, model) -> None:
    reply = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe a person."}], temperature=0, max_tokens=150,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    ask = 'Reply with a JSON object with one key, "greeting", whose value says hello.'
    loose = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": ask}],
                                        temperature=0, max_completion_tokens=120,
                                        response_format={"type": "json_object"})
    assert isinstance(json.loads(loose.choices[0].message.content), dict)


def test_openai_logprobs_are_probabilities(oai, model) -> None:
    reply = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}],
                                        temperature=0, max_tokens=5, logprobs=True, top_logprobs=4)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens or len(content) == reply.usage.completion_tokens - 1
    for position in content:
        assert len(position.top_logprobs) == 4
        assert sum(math.exp(t.logprob) for t in position.top_logprobs) <= 1 + 1e-6
        assert position.logprob <= 0 and position.token == "".join(position.token)
        assert position.top_logprobs[0].logprob >= position.logprob - 1e-9   # greedy took the top


def test_openai_stream_usage_and_logprob_deltas(oai, model) -> None:
    chunks = list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}],
                                              stream=True, stream_options={"include_usage": True}, temperature=0,
                                              max_completion_tokens=4, logprobs=True, top_logprobs=2))
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []
    positions = [p for c in chunks if c.choices and c.choices[0].logprobs for p in c.choices[0].logprobs.content]
    assert len(positions) == 4
    assert all(sum(math.exp(t.logprob) for t in p.top_logprobs) <= 1 + 1e-6 for p in positions)


def test_unknown_and_unsupported_fields_are_named_in_a_400(oai, model) -> None:
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        oai.chat.completions.create(model=model, messages=ASK, max_tokens=1, extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        oai.chat.completions.create(model=model, messages=ASK, max_tokens=1, logit_bias={"1": 5})


def test_think_on_a_model_without_thinking_is_400(oai, oll, model) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        oll.chat(model=model, messages=ASK, think=True)
    assert err.value.status_code == 400 and "thinking" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="thinking"):
        oai.chat.completions.create(model=model, messages=ASK, max_tokens=1, reasoning_effort="low")


def test_ollama_tool_call_streamed_and_not(oll, model) -> None:
    # Ollama has no tool_choice: a named-format answer is the way to force one; with tools offered,
    # a call the model writes is parsed into message.tool_calls. Forced through format here.
    whole = oll.chat(model=model, messages=ASK, format=PERSON, options={"temperature": 0, "num_predict": 150})
    jsonschema.validate(json.loads(whole.message.content), PERSON)
    parts = list(oll.chat(model=model, messages=ASK, format=PERSON, stream=True,
                          options={"temperature": 0, "num_predict": 150}))
    assert parts[-1].done
    jsonschema.validate(json.loads("".join(p.message.content for p in parts)), PERSON)


def test_ollama_show_tells_the_served_context_and_capabilities(oll, model) -> None:
    shown = oll.show(model)
    assert shown.parameters.strip() == "num_ctx 8192"
    assert shown.modelinfo["llama.context_length"] == 8192
    assert "completion" in shown.capabilities and "embedding" in shown.capabilities
    assert "thinking" not in shown.capabilities


def test_ollama_logprobs_and_embed_dimensions(oll, model) -> None:
    reply = oll.chat(model=model, messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=3,
                     options={"temperature": 0, "num_predict": 3})
    assert reply.logprobs and all(sum(math.exp(t.logprob) for t in p.top_logprobs) <= 1 + 1e-6
                                  for p in reply.logprobs)
    vectors = oll.embed(model=model, input=["one", "two"], dimensions=32).embeddings
    assert [len(v) for v in vectors] == [32, 32]
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)


def test_llamacpp_dialect_grammar_schema_probs_and_deadlines(live_server) -> None:
    with live_server.client(timeout=300) as http:
        yes_no = http.post("/completion", json={"prompt": "Is the sky blue? Answer:", "n_predict": 8,
                                                "temperature": 0, "grammar": 'root ::= " " ("yes" | "no")'}).json()
        assert yes_no["content"] in (" yes", " no")
        person = http.post("/completion", json={"prompt": "A person as JSON:", "n_predict": 150, "temperature": 0,
                                                "json_schema": PERSON, "n_probs": 3}).json()
        jsonschema.validate(json.loads(person["content"]), PERSON)
        probs = person["completion_probabilities"]
        assert probs and all(sum(math.exp(t["logprob"]) for t in p["top_logprobs"]) <= 1 + 1e-6 for p in probs)
        quick = http.post("/completion", json={"prompt": "Once upon a time", "n_predict": 60, "temperature": 0,
                                               "t_max_predict_ms": 1}).json()
        assert quick["stop_type"] == "limit" and quick["tokens_predicted"] <= 2
        bad = http.post("/completion", json={"prompt": "x", "grammar": "root ::= (", "n_predict": 2})
        assert bad.status_code == 400
