"""The real `ollama` client library (and raw httpx where editors send more) against a live daemon."""
from __future__ import annotations

import json

import ollama
import pytest

OPTIONS = {"num_predict": 6, "temperature": 0, "seed": 1}
TAG_DETAIL_FIELDS = {"format", "family", "families", "parameter_size", "quantization_level"}


@pytest.fixture(scope="module")
def client(live_server) -> ollama.Client:
    return ollama.Client(host=live_server.url, timeout=120)


@pytest.fixture(scope="module")
def model(live_server) -> str:
    return live_server.default_model()


def test_tags_have_every_field_zed_parses(live_server) -> None:
    with live_server.client() as http:
        models = http.get("/api/tags").json()["models"]
    assert models
    for entry in models:
        assert isinstance(entry["name"], str) and entry["model"] == entry["name"]
        assert entry["modified_at"].endswith("Z") and isinstance(entry["size"], int) and entry["size"] > 0
        assert len(entry["digest"]) == 64
        assert TAG_DETAIL_FIELDS <= entry["details"].keys()
        assert entry["details"]["format"] == "gguf" and isinstance(entry["details"]["families"], list)
        assert entry["details"]["quantization_level"] == "Q4_1"


def test_client_list_and_show(client, model) -> None:
    assert model in [m.model for m in client.list().models]
    shown = client.show(model)
    assert shown.details.family == "llama"
    assert "completion" in shown.capabilities
    assert "insert" not in shown.capabilities  # SmolLM2 has no FIM tokens
    assert shown.modelinfo["llama.context_length"] > 0
    assert "<|im_start|>" in shown.template


def test_show_accepts_the_older_name_field(live_server, model) -> None:
    with live_server.client() as http:
        response = http.post("/api/show", json={"name": model})
        missing = http.post("/api/show", json={})
    assert response.status_code == 200 and response.json()["details"]["format"] == "gguf"
    assert missing.status_code == 400 and "model" in missing.json()["error"]


def test_generate_not_streamed(client, model) -> None:
    reply = client.generate(model=model, prompt="Say hi", options=OPTIONS, stream=False)
    assert reply.done and reply.done_reason in ("stop", "length")
    assert reply.response
    assert 0 < reply.eval_count <= 6 and reply.prompt_eval_count > 0
    assert reply.total_duration >= reply.eval_duration > 0  # nanoseconds


def test_generate_streamed_equals_not_streamed(client, model) -> None:
    whole = client.generate(model=model, prompt="Say hi", options=OPTIONS, stream=False).response
    parts = list(client.generate(model=model, prompt="Say hi", options=OPTIONS, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == whole


def test_generate_raw_skips_the_template(client, model) -> None:
    raw = client.generate(model=model, prompt="1, 2, 3, 4,", raw=True, options=OPTIONS, stream=False)
    templated = client.generate(model=model, prompt="1, 2, 3, 4,", options=OPTIONS, stream=False)
    assert raw.response
    # The chat template adds SmolLM2's default system prompt and the role markers.
    assert raw.prompt_eval_count + 10 < templated.prompt_eval_count


def test_chat_streamed_and_not(client, model) -> None:
    messages = [{"role": "user", "content": "Say hi"}]
    whole = client.chat(model=model, messages=messages, options=OPTIONS, stream=False)
    assert whole.message.role == "assistant" and whole.message.content and whole.done
    parts = list(client.chat(model=model, messages=messages, options=OPTIONS, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done_reason in ("stop", "length")


def test_ndjson_is_the_default_framing(live_server, model) -> None:
    body = {"model": model, "prompt": "Say hi", "options": OPTIONS}
    with live_server.client() as http, http.stream("POST", "/api/generate", json=body) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[-1]["done"] is True and "eval_count" in lines[-1]


def test_empty_prompt_loads_and_keep_alive_zero_unloads(client, model) -> None:
    loaded = client.generate(model=model, prompt="")
    assert loaded.done and loaded.done_reason == "load"
    running = {m.model: m for m in client.ps().models}
    assert model in running
    entry = running[model]
    assert entry.size > 0 and entry.context_length > 0 and entry.expires_at is not None
    unloaded = client.chat(model=model, messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert model not in [m.model for m in client.ps().models]


def test_keep_alive_forever_is_capped_by_the_user_setting(client, model) -> None:
    client.generate(model=model, prompt="", keep_alive=-1)  # Zed sends -1
    entry = {m.model: m for m in client.ps().models}[model]
    # The default keep_alive of 5 minutes wins over the client's "forever".
    assert entry.expires_at.year < 2100


def test_embed(client, model) -> None:
    result = client.embed(model=model, input=["hello", "world"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) > 0


def test_version(live_server) -> None:
    with live_server.client() as http:
        version = http.get("/api/version").json()["version"]
    assert [int(part) for part in version.split(".")] >= [0, 1, 0]


def test_unknown_model_is_a_404_the_client_understands(client) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="no-such-model:7b", prompt="x", stream=False)
    assert err.value.status_code == 404 and "no-such-model" in err.value.error


@pytest.mark.parametrize("keep_alive", ["5m", "1h30m", "300ms", 30, "-1"])
def test_keep_alive_durations_are_accepted(live_server, model, keep_alive) -> None:
    with live_server.client() as http:
        response = http.post("/api/generate", json={"model": model, "prompt": "", "keep_alive": keep_alive})
    assert response.status_code == 200, response.text


def test_bad_keep_alive_and_options_are_400(live_server, model) -> None:
    with live_server.client() as http:
        bad_keep = http.post("/api/generate", json={"model": model, "prompt": "x", "keep_alive": "soon"})
        bad_temp = http.post("/api/chat", json={"model": model, "messages": [], "options": {"temperature": -1}})
    assert bad_keep.status_code == 400 and "keep_alive" in bad_keep.json()["error"]
    assert bad_temp.status_code == 400 and "temperature" in bad_temp.json()["error"]
