"""The real `openai` client library against a live daemon on the default model."""
from __future__ import annotations

import openai
import pytest

SHORT = {"max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(live_server) -> str:
    return live_server.default_model()


def test_models_lists_the_default_model(client, model) -> None:
    ids = [m.id for m in client.models.list()]
    assert model in ids
    assert client.models.retrieve(model).id == model


def test_chat_completion(client, model) -> None:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}], **SHORT)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= SHORT["max_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_completion_streams_with_usage(client, model) -> None:
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}],
                                            stream=True, stream_options={"include_usage": True}, **SHORT)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    # OpenAI's shape: the last chunk has no choices and carries the usage.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_and_not(client, model) -> None:
    whole = client.completions.create(model=model, prompt="The capital of France is", **SHORT)
    assert whole.choices[0].text and whole.object == "text_completion"
    pieces = list(client.completions.create(model=model, prompt="The capital of France is", stream=True, **SHORT))
    streamed = "".join(p.choices[0].text for p in pieces if p.choices)
    assert streamed == whole.choices[0].text  # greedy: the same text both ways


def test_completion_with_suffix_on_a_model_without_fim_is_a_clear_400(client, model) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="def f(", suffix="    return x\n", **SHORT)
    assert "infill" in str(err.value).lower() or "fill" in str(err.value).lower()


def test_embeddings(client, model) -> None:
    result = client.embeddings.create(model=model, input=["hello", "world"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == len(result.data[1].embedding) > 0
    assert result.usage.prompt_tokens > 0


def test_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model:7b", messages=[{"role": "user", "content": "x"}])


def test_prompt_longer_than_the_context_is_400(client, model) -> None:
    # The bundled model is served with its trained context (8,192): longer still.
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="hello " * 9000, max_tokens=1)
    assert "context" in str(err.value)


def test_n_above_one_is_400(client, model) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], n=2, max_tokens=1)
