"""Refusals a client can act on (issue 21): one status per kind of bad input on every
route, wrong types refused (never coerced), images refused, the Origin 403 naming its
setting, refused requests counted in /metrics, and a keep_alive cut to the setting said so."""
from __future__ import annotations

import re

import pytest


@pytest.fixture(scope="module")
def http(live_server):
    with live_server.client() as client:
        yield client


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {"model": "", "prompt": "hi", "stream": "yes"}),
    ("/api/chat", {"model": "", "messages": [], "stream": "yes"}),
    ("/v1/chat/completions", {"model": "", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
    ("/v1/completions", {"model": "", "prompt": "x", "stream": "yes"}),
    ("/completion", {"prompt": "x", "stream": "yes"}),
    ("/infill", {"input_prefix": "x", "stream": "yes"}),
    ("/completion", {"prompt": "x", "n_predict": "5"}),
    ("/api/generate", {"model": "", "prompt": "hi", "options": {"num_predict": "5"}}),
])
def test_a_field_of_the_wrong_type_is_400_naming_it_on_every_route(http, path, body) -> None:
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    field = "stream" if "stream" in body else ("n_predict" if "n_predict" in body else "num_predict")
    assert field in response.text


@pytest.mark.parametrize("path, body", [
    ("/api/generate", b"{not json"), ("/completion", b"{not json"), ("/v1/completions", b"{not json"),
    ("/api/chat", b'{"messages": 5}'), ("/completion", b'{"prompt": {"a": 1}}'), ("/infill", b'{"input_extra": 1}'),
])
def test_every_route_answers_400_for_a_body_it_cannot_take(http, path, body) -> None:
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text


def test_ollama_images_on_a_text_model_are_400_as_on_the_openai_route(http) -> None:
    generate = http.post("/api/generate", json={"model": "", "prompt": "What is this?", "images": ["aGk="]})
    chat = http.post("/v1/chat/completions", json={"model": "", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}]}]})
    assert generate.status_code == chat.status_code == 400
    assert "images" in generate.json()["error"] and "text only" in generate.json()["error"]


def test_a_foreign_origin_is_told_which_setting_allows_it(http) -> None:
    refused = http.get("/api/tags", headers={"Origin": "https://tool.example"})
    assert refused.status_code == 403
    message = refused.json()["error"]
    assert "allowed_origins" in message and "EBBTIDE_ORIGINS" in message and "https://tool.example" in message


def test_editor_webviews_and_desktop_shells_are_allowed_with_cors(http) -> None:
    for origin in ("vscode-webview://4a5b6c", "tauri://localhost", "app://obsidian.md", "file://"):
        response = http.get("/api/version", headers={"Origin": origin})
        assert response.status_code == 200, origin
        assert response.headers.get("access-control-allow-origin") == origin


def _count(metrics: str, status: str) -> float:
    pattern = rf'^ebbtide_http_requests_total{{[^}}]*status="{status}"[^}}]*}} (\S+)$'
    return sum(float(m) for m in re.findall(pattern, metrics, re.M))


def test_refused_requests_count_in_metrics(http) -> None:
    before = http.get("/metrics").text
    assert http.get("/api/tags", headers={"Origin": "https://evil.example"}).status_code == 403
    assert http.post("/api/generate", content=b"{" + b" " * (9 << 20) + b"}",
                     headers={"content-type": "application/json"}).status_code == 413
    assert http.post("/completion", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    after = http.get("/metrics").text
    for status in ("403", "413", "400"):
        assert _count(after, status) >= _count(before, status) + 1, status


def test_a_keep_alive_over_the_setting_is_cut_and_said_so(http) -> None:
    response = http.post("/api/generate", json={"model": "", "keep_alive": "1h"})   # load only
    assert response.status_code == 200
    note = response.headers["x-ebbtide-keep-alive"]
    assert "3600 s asked, 300 s granted" in note and "keep_alive setting" in note
    shorter = http.post("/api/generate", json={"model": "", "keep_alive": "1m"})
    assert "x-ebbtide-keep-alive" not in shorter.headers
