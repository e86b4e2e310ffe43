"""llama.cpp's server dialect over raw httpx, as llama.vscode and llama.vim send it."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def http(live_server):
    with live_server.client() as client:
        yield client


def test_health(http) -> None:
    response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_completion_not_streamed(http) -> None:
    body = http.post("/completion", json={"prompt": "1, 2, 3,", "n_predict": 4, "temperature": 0}).json()
    assert body["content"] and body["stop"] is True
    assert body["tokens_predicted"] == 4 and body["stop_type"] == "limit"
    assert body["timings"]["predicted_n"] == 4


def test_completion_streams_sse_content(http) -> None:
    events = []
    with http.stream("POST", "/completion", json={"prompt": "1, 2, 3,", "n_predict": 4, "temperature": 0,
                                                   "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert events[-1]["stop"] is True and not any(e["stop"] for e in events[:-1])
    whole = http.post("/completion", json={"prompt": "1, 2, 3,", "n_predict": 4, "temperature": 0}).json()
    assert "".join(e["content"] for e in events) == whole["content"]


def test_completion_accepts_token_ids(http) -> None:
    ids = http.post("/tokenize", json={"content": "1, 2, 3,"}).json()["tokens"]
    body = http.post("/completion", json={"prompt": ids, "n_predict": 2, "temperature": 0}).json()
    assert body["tokens_evaluated"] >= len(ids)


def test_infill_warm_up_with_n_predict_zero(http) -> None:
    # llama.vscode sends this when it starts, to load the model and cache the context.
    body = {"input_prefix": "def add(a, b):\n", "input_suffix": "\n", "input_extra": [], "n_predict": 0}
    response = http.post("/infill", json=body)
    assert response.status_code == 200 and response.json()["content"] == ""


def test_infill_on_a_model_without_fim_tokens_is_a_clear_400(http) -> None:
    body = {"input_prefix": "def add(a, b):\n", "input_suffix": "\n", "prompt": "    return",
            "input_extra": [{"filename": "util.py", "text": "X = 1\n"}], "n_predict": 8}
    response = http.post("/infill", json=body)
    assert response.status_code == 400
    assert "fill-in-the-middle" in response.json()["error"]["message"] or "FIM" in response.json()["error"]["message"]


def test_tokenize_detokenize_round_trip(http) -> None:
    tokens = http.post("/tokenize", json={"content": "Hello world"}).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert http.post("/detokenize", json={"tokens": tokens}).json()["content"] == "Hello world"
    pieces = http.post("/tokenize", json={"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world"


def test_detokenize_out_of_vocabulary_is_400_not_a_crash(http) -> None:
    response = http.post("/detokenize", json={"tokens": [1, 10**9]})
    assert response.status_code == 400
    assert http.get("/health").status_code == 200  # the daemon is still there


def test_metrics_count_requests_and_tokens(http) -> None:
    http.post("/completion", json={"prompt": "Hi", "n_predict": 2})
    text = http.get("/metrics").text
    assert 'ebbtide_http_requests_total{route="/completion",status="200"}' in text
    assert "ebbtide_completion_tokens_total{" in text
    assert "ebbtide_time_to_first_token_seconds_bucket{" in text
    assert 'ebbtide_model_memory_bytes{kind="weights"' in text or "ebbtide_model_memory_bytes{model=" in text
